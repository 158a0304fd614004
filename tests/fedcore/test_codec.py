"""Envelope, bodies and tensors: round trips (hypothesis) and each rejection's reason."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec
from fedcore.protocol.messages import (
    EncodedDelta,
    GlobalModel,
    Kind,
    ModelSpec,
    ModelUpdate,
    RoundAnnouncement,
    RoundSummary,
    Status,
)
from fedcore.protocol.tensors import (
    Tensor,
    decode_tensor,
    decode_tensors,
    encode_tensor,
    encode_tensors,
)

names = st.from_regex(r"[A-Za-z0-9_.\-]{1,20}", fullmatch=True)
float_arrays = hnp.arrays(
    dtype=st.sampled_from([np.float32, np.float16, np.float64]),
    shape=hnp.array_shapes(min_dims=0, max_dims=4, max_side=6),
    elements=st.floats(-1e3, 1e3, width=16),
)
int_arrays = hnp.arrays(
    dtype=st.sampled_from([np.int8, np.uint8, np.int16, np.int32, np.uint32, np.int64]),
    shape=hnp.array_shapes(min_dims=1, max_dims=3, max_side=6),
)


@given(st.one_of(float_arrays, int_arrays))
def test_tensor_round_trip_keeps_dtype_shape_and_values(array: np.ndarray) -> None:
    back = decode_tensor(encode_tensor(array))
    assert back.dtype == array.dtype.newbyteorder("<") or back.dtype == array.dtype
    assert back.shape == array.shape
    assert np.array_equal(back, array)


@settings(max_examples=50)
@given(names, names, names, st.integers(0, 2**31), st.lists(float_arrays, max_size=4),
       st.integers(1, 10**6), st.floats(0, 2e9, allow_nan=False))
def test_update_envelope_round_trip(fleet, task, sender, round_, arrays, samples, ts) -> None:
    arrays = [a.astype(np.float32) for a in arrays]
    delta = EncodedDelta((), tuple(a.shape for a in arrays), encode_tensors(arrays))
    body = ModelUpdate(round=round_, base_version=3, num_samples=samples, delta=delta,
                       stats={"eval_rmse": 1.5})
    env = codec.make_envelope(Kind.UPDATE, fleet, task, round_, sender, body, ts)
    back = codec.decode(codec.encode(env))
    assert back == env
    got = codec.decode_body(back, ModelUpdate)
    assert got == body
    for a, b in zip(decode_tensors(got.delta.parts), arrays, strict=True):
        assert np.array_equal(a, b)


def test_every_kind_round_trips() -> None:
    spec = ModelSpec("mlp", (3, 2, 1))
    bodies = {
        Kind.ROUND: RoundAnnouncement(round=1, model_version=0, deadline=10.0, selected=("a",)),
        Kind.MODEL: GlobalModel(1, 1, b"\x00" * 32, spec, encode_tensors([np.ones((3, 2), np.float32)])),
        Kind.METRICS: RoundSummary(round=1, model_version=1, participants=("a",), num_samples=5),
        Kind.STATUS: Status(state="online"),
    }
    for kind, body in bodies.items():
        env = codec.decode(codec.encode(codec.make_envelope(kind, "f", "t", 1, "s", body, 0.0)))
        assert codec.decode_body(env, type(body)) == body


def test_kind_and_body_type_must_agree() -> None:
    with pytest.raises(TypeError):
        codec.make_envelope(Kind.UPDATE, "f", "t", 1, "s", Status(state="online"), 0.0)
    env = codec.make_envelope(Kind.STATUS, "f", "t", 1, "s", Status(state="online"), 0.0)
    with pytest.raises(RemoteProtocolError) as err:
        codec.decode_body(env, ModelUpdate)
    assert err.value.reason == "bad_kind"


def _reason(fn, *args) -> str:
    with pytest.raises(RemoteProtocolError) as err:
        fn(*args)
    return err.value.reason


def test_rejections_name_the_problem() -> None:
    env = codec.make_envelope(Kind.STATUS, "f", "t", 1, "s", Status(state="online"), 0.0)
    good = codec.encode(env)
    assert _reason(codec.decode, good, codec.Limits(max_message_bytes=10)) == "too_large"
    assert _reason(codec.decode, good[:-3]) == "malformed"
    assert _reason(codec.decode, b"\x00garbage") == "malformed"
    future = codec.encode(codec.Envelope(99, *tuple(codec.msgspec.structs.astuple(env))[1:]))
    assert _reason(codec.decode, future) == "bad_version"
    odd = codec.encode(codec.msgspec.structs.replace(env, kind="pickle"))
    assert _reason(codec.decode, odd) == "bad_kind"
    bad_body = codec.msgspec.structs.replace(env, body=b"\x93\x01\x02")
    assert _reason(codec.decode_body, bad_body, Status) == "bad_body"
    # message ids are kept (replay guard, checkpoint): a peer cannot make them large
    for message_id in ("", "x" * (codec.MAX_MESSAGE_ID + 1), "y" * 100_000):
        long_id = codec.encode(codec.msgspec.structs.replace(env, message_id=message_id))
        assert _reason(codec.decode, long_id) == "malformed"
    assert codec.decode(codec.encode(codec.msgspec.structs.replace(env, message_id="z" * codec.MAX_MESSAGE_ID)))


def test_tensor_rejections() -> None:
    assert _reason(decode_tensor, Tensor("|O", (1,), b"x")) == "bad_dtype"
    assert _reason(decode_tensor, Tensor("<f4", (2,), b"\x00" * 7)) == "bad_length"
    assert _reason(decode_tensor, Tensor("<f4", (-1,), b"")) == "bad_shape"
    assert _reason(decode_tensor, Tensor("<f4", (10**9,), b""), 1000) == "too_large"
    nan = encode_tensor(np.array([np.nan], np.float32))
    assert _reason(decode_tensor, nan) == "not_finite"
    # one element budget across all tensors of a message
    two = encode_tensors([np.zeros(600, np.float32), np.zeros(600, np.float32)])
    assert _reason(decode_tensors, two, 1000) == "too_large"
