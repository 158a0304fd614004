"""Every decoder a peer can reach survives random and mutated bytes with a reasoned rejection.

100,000 mutated payloads (tests/fedcore/fuzz_harness.py) plus hypothesis-generated inputs;
the only exception allowed out of a decoder is RemoteProtocolError with a reason.
"""

from __future__ import annotations

import tracemalloc

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec, signing, tensors
from fedcore.protocol.messages import BODY_TYPES, Kind
from fedcore.protocol.topics import parse_topic
from tests.fedcore import fuzz_harness as harness

FAST = settings(max_examples=1000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
U64 = st.integers(min_value=-(2**63), max_value=2**64 - 1)


def rejected_or_ok(fn, *args) -> str:  # type: ignore[no-untyped-def]
    try:
        fn(*args)
    except RemoteProtocolError as exc:
        assert exc.reason, repr(exc)
        return exc.reason
    return "ok"


@pytest.mark.timeout(180)
def test_100k_mutated_payloads_only_reasoned_rejections() -> None:
    stats = harness.fuzz(100_000, seed=20261127)
    assert stats.payloads == 100_000
    assert not stats.crashes, stats.crashes[:5]
    # The mutations reached every decoder, and each one accepted some inputs and refused others.
    names = {"codec.decode", "signing.authenticate", "decode_tensors", "parse_topic"}
    names |= {f"decode_body:{k.value}" for k in Kind}
    if harness.DECODE_UPDATE is not None:
        names.add("pipeline.decode_update")
    for name in names:
        assert stats.accepted[name] > 0, name
        assert any(key.startswith(name + ":") for key in stats.rejected), name
    reasons = {key.split(":")[-1] for key in stats.rejected}
    assert {"malformed", "bad_body", "bad_signature", "replayed", "bad_topic"} <= reasons


def test_fuzzing_memory_is_bounded() -> None:
    tracemalloc.start()
    try:
        stats = harness.fuzz(3_000, seed=5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not stats.crashes
    # Inflated length fields claim up to 4 GiB; nothing may be allocated on their word.
    assert peak < 16 * 1024 * 1024, peak


def test_regressions_found_by_fuzzing() -> None:
    env = harness.seed_envelopes()[5]
    raw = bytearray(codec.encode(env))
    i = raw.index(b"plant")
    raw[i] = 0xFF  # invalid UTF-8 inside the fleet string
    assert rejected_or_ok(codec.decode, bytes(raw)) == "malformed"
    empty_but_huge = tensors.Tensor("<f4", (0, 2**62), b"")
    assert rejected_or_ok(tensors.decode_tensors, [empty_but_huge]) == "too_large"


@FAST
@given(st.binary(max_size=4096))
def test_random_bytes_into_the_envelope_decoder(data: bytes) -> None:
    rejected_or_ok(codec.decode, data, harness.LIMITS)


@FAST
@given(
    kind=st.sampled_from([k.value for k in Kind] + ["", "x"]),
    fleet=st.text(max_size=20), sender=st.sampled_from(["gw1", "aggregator", "gw2", ""]) | st.text(max_size=8),
    round_=U64, message_id=st.text(max_size=30), timestamp=st.floats(allow_nan=True),
    body=st.binary(max_size=512), signature=st.binary(max_size=80),
)
def test_structured_envelopes_through_every_decoder(
    kind: str, fleet: str, sender: str, round_: int, message_id: str, timestamp: float, body: bytes, signature: bytes
) -> None:
    raw = msgspec.msgpack.encode([1, kind, fleet, "wind", round_, sender, message_id, timestamp, body, signature])
    try:
        env = codec.decode(raw, harness.LIMITS)
    except RemoteProtocolError as exc:
        assert exc.reason
        return
    guard = signing.ReplayGuard(current_round=3)
    rejected_or_ok(signing.authenticate, env, harness.KEYRING, guard, sender)
    rejected_or_ok(codec.decode_body, env, BODY_TYPES[Kind(env.kind)])


@FAST
@given(
    dtype=st.sampled_from([*tensors.ALLOWED_DTYPES, ">f4", "|O", "|V8", "<c8", "", "<U4"]),
    shape=st.lists(U64, max_size=10),
    data=st.binary(max_size=256),
    count=st.integers(1, 3),
)
def test_structured_tensors(dtype: str, shape: list[int], data: bytes, count: int) -> None:
    raw = msgspec.msgpack.encode([[dtype, shape, data]] * count)
    try:
        parts = msgspec.msgpack.decode(raw, type=tuple[tensors.Tensor, ...])
    except (msgspec.ValidationError, msgspec.DecodeError):
        return  # msgspec refused the shape (e.g. above int64) before fedgate saw it
    outcome = rejected_or_ok(tensors.decode_tensors, parts, 1024)
    if outcome == "ok":
        arrays = tensors.decode_tensors(parts, 1024)
        assert sum(a.size for a in arrays) <= 1024


@settings(max_examples=500, deadline=None, database=None)
@given(st.text(max_size=120) | st.lists(st.sampled_from(["fg", "plant", "wind", "update", "gw1", "+", "#", "", "status", "round", "secagg"]), max_size=7).map("/".join))
def test_topics(topic: str) -> None:
    if rejected_or_ok(parse_topic, topic) == "ok":
        parsed = parse_topic(topic)
        assert "+" not in topic and "#" not in topic
        assert parsed.fleet == topic.split("/")[1]
