"""A plant system's subscriber to the deployed model, written from docs/protocol.md alone.

It imports nothing of fedgate: a msgpack decoder (msgspec's generic one), an Ed25519
implementation (``cryptography``) and the LiteRT interpreter. Tests use it to prove that
the documentation is enough to decode, verify and run what ``fg/{fleet}/{task}/deployed``
carries.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import msgspec
import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

SIGNATURE_FIELD = 2 + 64  # msgpack bin 8 header (0xc4, 64) + 64 signature bytes


@dataclass
class Deployed:
    fleet: str
    task: str
    sender: str
    sequence: int
    lineage: str
    version: int
    features: list[str]
    target: str
    tflite: bytes
    spec: list[Any]  # the whole spec array (docs/protocol.md), fleet scaler included


def decode_and_verify(payload: bytes, aggregator_key_hex: str) -> Deployed:
    """Decode the envelope, check its Ed25519 signature and the model's SHA-256."""
    envelope = msgspec.msgpack.decode(payload)
    version, kind, fleet, task, _round, sender, _mid, _ts, body, signature = envelope
    if version != 1 or kind != "deployed":
        raise ValueError(f"not a deployed-model envelope: version {version}, kind {kind!r}")
    # the signed bytes: the envelope's array without its last element, header 0x9a -> 0x99
    if payload[0] != 0x9A or len(signature) != 64 or payload[-SIGNATURE_FIELD:-64] != b"\xc4\x40":
        raise ValueError("unexpected envelope layout")
    signed = b"\x99" + payload[1:-SIGNATURE_FIELD]
    Ed25519PublicKey.from_public_bytes(bytes.fromhex(aggregator_key_hex)).verify(signature, signed)
    sequence, lineage, model_version, spec, tflite, sha256 = msgspec.msgpack.decode(body)
    if hashlib.sha256(tflite).digest() != sha256:
        raise ValueError("the .tflite does not match its SHA-256")
    kind_, sizes, activation, task_kind, features, target, *_scaler = spec
    del kind_, sizes, activation, task_kind
    return Deployed(fleet, task, sender, sequence, lineage, model_version, list(features),
                    target, bytes(tflite), list(spec))


def run_tflite(tflite: bytes, x_raw: np.ndarray) -> np.ndarray:
    """Raw feature rows in, the target in its own unit out (the scaler is inside)."""
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=tflite)
    inp = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(inp["index"], [len(x_raw), x_raw.shape[1]])
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], np.asarray(x_raw, np.float32))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))


def aggregator_key(keyring: dict[str, Any]) -> str:
    """The aggregator's public key (hex) from a fleet's keyring.json."""
    return str(keyring["aggregator"]["public_key"])
