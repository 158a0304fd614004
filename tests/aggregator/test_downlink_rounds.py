"""Downlink modes wired end to end: a RoundStateMachine and Participants through the codec."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from aggregator import rounds as agg
from aggregator.config import load_aggregator_config
from edge import participant as edge
from fedcore.compression.downlink import decode_model, encode_model
from fedcore.errors import ConfigError
from fedcore.protocol.messages import ModelSpec
from tests.pair import Federation, Gateway

SPEC = ModelSpec(kind="mlp", layer_sizes=(64, 32))
SHAPES = ((64, 32), (32,))


def initial() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.normal(0, 0.5, s).astype(np.float32) for s in SHAPES]


def run(mode: str, rounds: int = 12, gateways: list[Gateway] | None = None, **config) -> Federation:
    gws = gateways or [Gateway("a", 1.0, 100), Gateway("b", 3.0, 300)]
    cfg = agg.RoundConfig(rounds=rounds, min_participants=len(gws), downlink=mode, **config)
    fed = Federation(gws, cfg, weights=initial(), spec=SPEC)
    fed.start()
    return fed


def held_by_int8(master: list[np.ndarray]) -> list[np.ndarray]:
    enc = encode_model(master, "int8")
    return decode_model("int8", enc.tensors, enc.scales, SHAPES)


def test_int8_gateways_hold_decode_of_encode_of_the_master_every_round() -> None:
    fed = run("int8")
    for _ in range(5):
        expected = held_by_int8(fed.server.weights)
        for g in fed.gateways.values():
            assert g.machine.version == fed.server.version
            assert all(np.array_equal(h, e) for h, e in zip(g.machine.weights, expected, strict=True))
        assert fed.retained_model.encoding == "int8"
        fed.flush()
    assert not fed.of(agg.UpdateRejected)


def test_int8_converges_like_fp32() -> None:
    results = {}
    for mode in ("fp32", "int8"):
        fed = run(mode)
        for _ in range(12):
            fed.flush()
        assert fed.of(agg.RunFinished)
        results[mode] = (fed.server.weights, fed.gateways["a"].machine.weights)
    target = 2.5  # sample-weighted mean of the gateways' targets
    fp32_master, _ = results["fp32"]
    int8_master, int8_held = results["int8"]
    assert max(float(np.max(np.abs(w - target))) for w in fp32_master) < 1e-2
    # what the int8 gateways hold reaches the target within about one quantization step
    step = target / 127
    assert max(float(np.max(np.abs(w - target))) for w in int8_held) < 1e-2 + step
    assert max(float(np.max(np.abs(a - b))) for a, b in zip(int8_master, fp32_master, strict=True)) < 0.05


def test_int8_model_messages_are_about_four_times_smaller() -> None:
    sizes = {}
    for mode in ("fp32", "int8"):
        fed = run(mode, rounds=2)
        fed.flush()
        fed.flush()
        sizes[mode] = fed.model_bytes
    assert len(sizes["fp32"]) == len(sizes["int8"]) == 3
    for fp32, int8 in zip(sizes["fp32"], sizes["int8"], strict=True):
        assert 3.5 < fp32 / int8 < 4.0


def test_delta_tracks_the_master_closer_than_int8() -> None:
    fed = run("delta", downlink_full_every=0)
    encodings = []
    for _ in range(8):
        fed.flush()
        encodings.append(fed.retained_model.encoding)
        master, held = fed.server.weights, fed.gateways["b"].machine.weights
        assert all(np.array_equal(h, s) for h, s in zip(held, fed.server.downlink.held, strict=True))
    assert encodings[:7] == ["delta"] * 7
    gap = max(float(np.max(np.abs(m - h))) for m, h in zip(master, held, strict=True))
    int8_gap = max(float(np.max(np.abs(m - h)))
                   for m, h in zip(master, held_by_int8(master), strict=True))
    assert gap < int8_gap / 10
    assert not fed.of(agg.UpdateRejected)


def test_delta_full_model_every_n_versions() -> None:
    fed = run("delta", rounds=6, downlink_full_every=3)
    seen = {}
    for _ in range(6):
        fed.flush()
        seen[fed.retained_model.version] = fed.retained_model.encoding
    assert seen == {1: "delta", 2: "delta", 3: "int8", 4: "delta", 5: "delta", 6: "int8"}
    held = fed.gateways["a"].machine.weights
    assert all(np.array_equal(h, s) for h, s in zip(held, fed.server.downlink.held, strict=True))


def test_delta_gateway_offline_for_a_round_recovers() -> None:
    gws = [Gateway("a", 1.0, 100), Gateway("b", 3.0, 300), Gateway("c", 2.0, 100)]
    fed = run("delta", rounds=8, gateways=gws, downlink_full_every=0)
    fed.server.config = agg.RoundConfig(rounds=8, min_participants=2, downlink="delta",
                                        downlink_full_every=0)
    fed.flush()  # round 1 with everyone: model 1 is a delta
    c = fed.gateways["c"]
    c.online = False
    fed.feed(agg.DeviceOffline(fed.now, "c"))
    fed.flush(drop={"c"})  # round 2: c left it and is awaited for the straggler window
    fed.now += 6
    fed.feed(agg.Tick(fed.now))
    fed.flush()  # rounds 2 and 3 without c: model 3 is a delta on 2, never seen by c
    assert fed.retained_model.encoding == "delta" and c.machine.version == 1
    refused = c.machine.handle(edge.ModelReceived(fed.now, fed.retained_model))
    assert refused == [edge.ModelRefused(3, "missing_base")]
    before = len(fed.model_bytes)
    fed.reconnect(c)  # the aggregator re-sends version 3 in full; c installs it and trains
    assert fed.retained_model.version == 3 and fed.retained_model.encoding == "fp32"
    assert len(fed.model_bytes) == before + 1
    assert c.machine.version == 3
    for _ in range(5):
        fed.flush()
    assert fed.of(agg.RunFinished)
    # after the re-send everyone (those that held the delta too) follows the same chain
    assert fed.retained_model.encoding == "delta"
    for g in fed.gateways.values():
        assert g.machine.version == fed.server.version
        assert all(np.array_equal(h, s) for h, s in zip(g.machine.weights, fed.server.downlink.held, strict=True))
    accepted = {a.device for a in fed.of(agg.UpdateAccepted) if a.round >= 4}
    assert accepted == {"a", "b", "c"}
    assert not fed.of(agg.UpdateRejected)


def test_delta_restored_aggregator_resends_the_held_model_and_the_chain_continues() -> None:
    fed = run("delta", rounds=6, downlink_full_every=0)
    fed.flush()
    fed.flush()
    checkpoint = [a for a in fed.of(agg.SaveCheckpoint)][-1].checkpoint
    held = [h.copy() for h in fed.server.downlink.held]
    restored = agg.RoundStateMachine(fed.server.config, SPEC, initial(), random.Random(0))
    restored.restore(checkpoint)
    assert restored.model.encoding == "fp32" and restored.model.version == 2
    assert all(np.array_equal(h, s) for h, s in zip(restored.downlink.held, held, strict=True))
    fed.server = restored
    fed.start()  # republishes the re-send; gateways adopt it as their chain head
    for _ in range(4):
        fed.flush()
    assert fed.of(agg.RunFinished)
    # the updates queued before the restart arrive twice (cached resend): dropped by id
    assert {a.reason for a in fed.of(agg.UpdateRejected)} <= {"duplicate"}
    for g in fed.gateways.values():  # a refused parent would have stalled them at 2 or 3
        assert g.machine.version == 6


def _config(tmp_path: Path, downlink: str) -> Path:
    path = tmp_path / "aggregator.toml"
    path.write_text(
        '[task]\nfleet = "f"\nname = "t"\n[model]\nkind = "mlp"\nlayer_sizes = [2, 1]\nscaling = "none"\n'
        f'[rounds]\ndownlink = "{downlink}"\ndownlink_full_every = 4\n'
    )
    return path


def test_config_reads_downlink(tmp_path: Path) -> None:
    cfg = load_aggregator_config(_config(tmp_path, "delta"))
    assert cfg.rounds.downlink == "delta" and cfg.rounds.downlink_full_every == 4


def test_config_rejects_unknown_downlink(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load_aggregator_config(_config(tmp_path, "int4"))
    text = str(err.value)
    assert "downlink" in text and "int4" in text and "aggregator.toml" in text
