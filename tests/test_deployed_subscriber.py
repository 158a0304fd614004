"""Other plant systems subscribe to the deployed model: the documented envelope, decoded and
verified without fedgate (tests/deployed_subscriber.py), and the .tflite it carries computes
the fleet's model on raw units."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.exceptions import InvalidSignature

from aggregator.deployment import deployed_model
from fedcore.learning.models import forward, init_params
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import Kind, ModelSpec
from tests.deployed_subscriber import decode_and_verify, run_tflite

KEY = signing.SigningKey.from_seed(b"\x07" * 32)
SPEC = ModelSpec("mlp", (3, 8, 1), features=("Ws_avg", "sin(Wa_avg)", "Ot_avg"), target="P_avg",
                 feature_mean=(7.0, 0.1, 12.0), feature_std=(2.5, 0.7, 7.0), target_mean=345.0,
                 target_std=420.0)


def _payload(spec: ModelSpec = SPEC) -> tuple[bytes, list[np.ndarray]]:
    weights = init_params(spec, np.random.default_rng(3))
    body = deployed_model(spec, weights, 4, "20261202T103000Z-9f3a", 17)
    env = codec.make_envelope(Kind.DEPLOYED, "plant1", "wind-power", 0, "aggregator", body, 1.5e9)
    return codec.encode(signing.sign(env, KEY)), weights


def test_a_subscriber_without_fedgate_decodes_verifies_and_runs_the_model() -> None:
    payload, weights = _payload()
    got = decode_and_verify(payload, KEY.verify_key.hex())
    assert (got.fleet, got.task, got.sender) == ("plant1", "wind-power", "aggregator")
    assert (got.sequence, got.version, got.lineage) == (4, 17, "20261202T103000Z-9f3a")
    assert got.features == ["Ws_avg", "sin(Wa_avg)", "Ot_avg"] and got.target == "P_avg"
    raw = np.random.default_rng(1).normal([7, 0, 12], [3, 0.7, 8], size=(32, 3))
    scaled = (raw - np.array(SPEC.feature_mean)) / np.array(SPEC.feature_std)
    want = forward(SPEC, weights, scaled.astype(np.float32)) * SPEC.target_std + SPEC.target_mean
    assert np.allclose(run_tflite(got.tflite, raw), want, rtol=1e-4, atol=1e-2)


def test_a_tampered_message_fails_verification() -> None:
    payload, _ = _payload()
    body_at = payload.index(b"TFL3")
    tampered = payload[:body_at] + b"X" + payload[body_at + 1:]
    with pytest.raises(InvalidSignature):
        decode_and_verify(tampered, KEY.verify_key.hex())
    other = signing.SigningKey.from_seed(b"\x08" * 32)
    with pytest.raises(InvalidSignature):
        decode_and_verify(payload, other.verify_key.hex())
