"""Mutation fuzzing of every decoder a peer can reach (shared by the test and bench/fuzz_decoders.py).

Seeds are valid, signed envelopes of every kind (with real tensors) and valid topics. Each
fuzz case mutates one seed - bit flips, interesting bytes, truncation, splices from another
seed, chunk deletion/duplication, and msgpack length-field inflation - and runs every
decoder it can reach:

- ``codec.decode`` on the mutated envelope bytes, then ``signing.verify`` / ``authenticate``,
  ``codec.decode_body`` (with the right and a wrong schema), ``tensors.decode_tensors`` on
  every tensor inside, and ``fedcore.pipeline.decode_update`` (seeded with updates the real
  gateway pipeline compressed: top-k, int8, zstd/zlib) when that module exists;
- the same body decoders on a mutated *body* re-wrapped in a well-formed envelope, so body
  parsing is exercised even where a mutated envelope would already fail;
- ``topics.parse_topic`` on mutated topics.

The only exception allowed out of a decoder is ``RemoteProtocolError`` with a non-empty
reason; anything else is recorded as a crash with the payload that caused it.
"""

from __future__ import annotations

import importlib
import random
import struct
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec, signing, tensors
from fedcore.protocol.messages import (
    BODY_TYPES,
    CanaryReport,
    ChunkManifest,
    DataStats,
    DeployedModel,
    Deployment,
    EncodedDelta,
    GlobalModel,
    Kind,
    ModelSpec,
    ModelUpdate,
    PipelineConfig,
    RoundAnnouncement,
    RoundPoint,
    RoundSummary,
    SecAggMessage,
    Status,
    TaskState,
    Telemetry,
    TrainConfig,
)
from fedcore.protocol.topics import Topics, parse_topic

LIMITS = codec.Limits(max_message_bytes=256 * 1024, max_elements=64 * 1024)
GW1 = signing.SigningKey.from_seed(b"\x11" * 32)
AGG = signing.SigningKey.from_seed(b"\x22" * 32)
KEYRING = signing.Keyring({"gw1": GW1.verify_key}, "aggregator", AGG.verify_key)
TOPICS = Topics("plant", "wind")
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xC0, 0xC1, 0xC4, 0xC6, 0xCF, 0xD3, 0xDD, 0xDF, 0x90, 0x9F)
# msgpack headers whose following bytes are a length: (first byte, width of the length field)
LENGTH_HEADERS = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


SHAPES = ((4, 3), (3,))  # the seed model's layer shapes


def _pipeline() -> Any:
    """``fedcore.pipeline`` (encode_update / decode_update) if it exists in this build."""
    try:
        module = importlib.import_module("fedcore.pipeline")
    except ModuleNotFoundError:
        return None
    return module if hasattr(module, "decode_update") and hasattr(module, "encode_update") else None


PIPELINE = _pipeline()


def _decode_update(delta: EncodedDelta) -> Any:
    assert PIPELINE is not None
    return PIPELINE.decode_update(delta, SHAPES, codec.Limits(max_elements=LIMITS.max_elements))


DECODE_UPDATE = _decode_update if PIPELINE is not None else None


def seed_bodies() -> list[msgspec.Struct]:
    rng = np.random.default_rng(7)
    w = [rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(3,)).astype(np.float32)]
    spec = ModelSpec("mlp", (4, 3), features=("a", "b", "c", "d"), target="y")
    return [
        RoundAnnouncement(3, 2, 1000.0, TrainConfig(2, 16, 0.05), PipelineConfig(1.0, 0.5, ("topk:0.1", "int8")), ("gw1",)),
        ModelUpdate(3, 2, 120, EncodedDelta((), ((4, 3), (3,)), tensors.encode_tensors(w)), 0.25, True, {"n": 1.0}),
        ModelUpdate(3, 2, 50, EncodedDelta(("int8",), ((4, 3),), (tensors.encode_tensor(np.arange(12, dtype=np.int8)),))),
        GlobalModel(2, 2, b"\x00" * 32, spec, tensors.encode_tensors(w)),
        *downlink_models(spec, w),
        RoundSummary(3, 2, ("gw1", "gw2"), 170, {"mae": 0.1}, 100, 200, 0.5, {"replayed": 1}, {"gw1": 1.0}, ("x",)),
        Status("online", "0.1", 2, {"k": "v"}),
        Telemetry(2, {"score": 0.3}, ("alert",)),
        SecAggMessage("keys", b"\x05" * 40),
        DataStats("L1", ("a", "b"), 40, (1.0, 2.0), (3.0, 4.0)),
        CanaryReport(4, 3, 2, {"rmse": 1.0}, {"rmse": 1.1}, 30),
        Deployment(4, "L1", "canary", 2, tensors.encode_tensors(w), 3, tensors.encode_tensors(w), ("gw1",), "auto", 1.0),
        DeployedModel(4, "L1", 2, spec, b"TFL3" * 8, b"\x00" * 32),
        ChunkManifest("model", 70, 32, (b"\x02" * 32, b"\x03" * 32, b"\x04" * 32), b"\x05" * 32),
        TaskState("L1", "waiting", 3, 2, 0, "schedule", 5.0, ("gw1",), (), (), 2, "latest", -1, (), {"late": 1},
                  {"gw1": 0.5}, "rmse", False, (RoundPoint(2, 2, 1, 100, 0.5, 0.1, 1.0),), 2.0),
    ]


def downlink_models(spec: ModelSpec, w: list[np.ndarray]) -> list[GlobalModel]:
    """Global models as the aggregator's int8 and delta downlinks encode them."""
    from fedcore.compression.downlink import encode_model

    out = []
    for mode in ("int8", "delta"):
        m = encode_model(w, mode, [a * 0.9 for a in w] if mode == "delta" else None)
        out.append(GlobalModel(3, 3, b"\x01" * 32, spec, m.tensors, m.encoding, m.scales))
    return out


def _receive_model(model: GlobalModel) -> Any:
    """The gateway's model decoder, holding the previous version (so deltas apply)."""
    from edge.participant import receive_model

    held = [np.zeros((4, 3), np.float32), np.zeros((3,), np.float32)]
    return receive_model(model, model.version - 1, held)


def pipeline_updates() -> list[ModelUpdate]:
    """Updates as the gateway's real pipeline encodes them (compressed paths included)."""
    if PIPELINE is None:
        return []
    rng = np.random.default_rng(11)
    delta = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    out = []
    for stages in [(), ("int8",), ("topk:0.25",), ("topk:0.5", "int8", "zstd"), ("int8:4", "zlib")]:
        config = PipelineConfig(clip_norm=1.0, noise_multiplier=0.1, compression=stages)
        encoded, _ = PIPELINE.encode_update(delta, config, PIPELINE.EdgePipelineState(), rng)
        out.append(ModelUpdate(3, 2, 10, encoded))
    return out


def seed_envelopes() -> list[codec.Envelope]:
    out = []
    for body in seed_bodies() + pipeline_updates():
        kind = next(k for k, t in BODY_TYPES.items() if t is type(body))
        sender = "aggregator" if kind.value in signing.AGGREGATOR_KINDS else "gw1"
        env = codec.make_envelope(kind, "plant", "wind", 3, sender, body, timestamp=1.5, message_id=f"{kind.value}-{len(out)}")
        out.append(signing.sign(env, AGG if sender == "aggregator" else GW1))
    return out


def seed_topics() -> list[str]:
    return [TOPICS.round(), TOPICS.model(), TOPICS.metrics(), TOPICS.deployment(),
            TOPICS.deployed(), TOPICS.state(), TOPICS.update("gw1"),
            TOPICS.secagg("keys", "gw1"), TOPICS.status("gw1"), TOPICS.telemetry("gw1"),
            TOPICS.model_chunk(b"\x06" * 32), TOPICS.update_chunk("gw1")]


def mutate(data: bytes, rng: random.Random, donors: list[bytes]) -> bytes:
    """One to three random mutations of ``data``."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(8)
        if op == 0 and buf:  # bit flips
            for _ in range(rng.randint(1, 8)):
                i = rng.randrange(len(buf))
                buf[i] ^= 1 << rng.randrange(8)
        elif op == 1 and buf:  # interesting byte
            buf[rng.randrange(len(buf))] = rng.choice(INTERESTING)
        elif op == 2:  # truncation
            buf = buf[: rng.randrange(len(buf) + 1)]
        elif op == 3:  # splice a piece of another seed in
            donor = rng.choice(donors)
            a = rng.randrange(len(donor) + 1)
            piece = donor[a : a + rng.randint(1, 64)]
            i = rng.randrange(len(buf) + 1)
            buf[i : i + (len(piece) if rng.random() < 0.5 else 0)] = piece
        elif op == 4 and buf:  # delete a chunk
            i = rng.randrange(len(buf))
            del buf[i : i + rng.randint(1, 16)]
        elif op == 5 and buf:  # duplicate a chunk
            i = rng.randrange(len(buf))
            buf[i:i] = buf[i : i + rng.randint(1, 32)]
        elif op == 6:  # inflate a length field
            spots = [i for i, b in enumerate(buf) if b in LENGTH_HEADERS or 0x90 <= b <= 0x9F]
            if spots:
                i = rng.choice(spots)
                width = LENGTH_HEADERS.get(buf[i], 0)
                if width == 0:
                    buf[i] = 0x9F  # fixarray: claim 15 elements
                else:
                    value = rng.choice([(1 << (8 * width)) - 1, 1 << (8 * width - 1), rng.randrange(1 << (8 * width))])
                    buf[i + 1 : i + 1 + width] = value.to_bytes(width, "big")
        else:  # random garbage
            i = rng.randrange(len(buf) + 1)
            buf[i:i] = rng.randbytes(rng.randint(1, 16))
    return bytes(buf)


@dataclass
class FuzzStats:
    payloads: int = 0
    accepted: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    crashes: list[tuple[str, bytes, str]] = field(default_factory=list)

    def run(self, name: str, payload: bytes, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            result = fn(*args)
        except RemoteProtocolError as exc:
            if not exc.reason:
                self.crashes.append((name, payload, f"empty reason: {exc!r}"))
            self.rejected[f"{name}:{exc.reason}"] += 1
            return None
        except Exception as exc:  # the whole point: anything else is a decoder bug
            self.crashes.append((name, payload, f"{type(exc).__name__}: {exc}"))
            return None
        self.accepted[name] += 1
        return result


def body_tensors(body: Any) -> tuple[tensors.Tensor, ...]:
    if isinstance(body, ModelUpdate):
        return body.delta.parts
    if isinstance(body, GlobalModel):
        return body.tensors
    if isinstance(body, Deployment):
        return body.tensors + body.candidate_tensors
    return ()


def check_body(stats: FuzzStats, payload: bytes, env: codec.Envelope) -> None:
    kind = Kind(env.kind)
    expected = BODY_TYPES[kind]
    wrong = BODY_TYPES[Kind.STATUS if kind is not Kind.STATUS else Kind.TELEMETRY]
    stats.run("decode_body_wrong_kind", payload, codec.decode_body, env, wrong)
    body = stats.run(f"decode_body:{kind.value}", payload, codec.decode_body, env, expected)
    if body is None:
        return
    parts = body_tensors(body)
    if parts:
        stats.run("decode_tensors", payload, tensors.decode_tensors, parts, LIMITS.max_elements)
    if DECODE_UPDATE is not None and isinstance(body, ModelUpdate):
        stats.run("pipeline.decode_update", payload, DECODE_UPDATE, body.delta)
    if isinstance(body, GlobalModel):
        stats.run("participant.receive_model", payload, _receive_model, body)


def check_envelope_bytes(stats: FuzzStats, payload: bytes, guard: signing.ReplayGuard) -> None:
    stats.payloads += 1
    env = stats.run("codec.decode", payload, codec.decode, payload, LIMITS)
    if env is None:
        return
    stats.run("signing.authenticate", payload, signing.authenticate, env, KEYRING, guard, env.sender)
    check_body(stats, payload, env)


def check_body_bytes(stats: FuzzStats, payload: bytes, template: codec.Envelope) -> None:
    stats.payloads += 1
    env = msgspec.structs.replace(template, body=payload)
    check_body(stats, payload, env)


def check_topic(stats: FuzzStats, payload: bytes) -> None:
    stats.payloads += 1
    topic = payload.decode("utf-8", errors="replace")
    stats.run("parse_topic", payload, parse_topic, topic)


def fuzz(n: int, seed: int = 0) -> FuzzStats:
    """Run ``n`` mutated payloads: 45% envelopes, 45% bodies, 10% topics."""
    rng = random.Random(seed)
    envs = seed_envelopes()
    env_bytes = [codec.encode(e) for e in envs]
    topics = [t.encode() for t in seed_topics()]
    donors = env_bytes + [e.body for e in envs] + topics + [struct.pack("<d", float("nan"))]
    guard = signing.ReplayGuard(window_rounds=4, max_ids=4096, current_round=3)
    stats = FuzzStats()
    for i in range(n):
        r = i % 20
        if r < 9:
            check_envelope_bytes(stats, mutate(rng.choice(env_bytes), rng, donors), guard)
        elif r < 18:
            env = rng.choice(envs)
            check_body_bytes(stats, mutate(env.body, rng, donors), env)
        else:
            check_topic(stats, mutate(rng.choice(topics), rng, donors))
    return stats
