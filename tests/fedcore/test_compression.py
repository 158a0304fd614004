"""Compression stages alone: top-k, stochastic int8, entropy coding, stage parsing, downlink."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import zstandard

from fedcore.compression import entropy, quantize, topk
from fedcore.compression.downlink import decode_model, encode_model
from fedcore.compression.stages import flat_layout, parse_stages, topk_count
from fedcore.errors import RemoteProtocolError
from fedcore.protocol.tensors import encode_tensor


def test_topk_keeps_the_largest_magnitudes_and_gaps_round_trip() -> None:
    v = np.array([0.1, -5.0, 0.2, 3.0, -0.05, 4.0], dtype=np.float32)
    idx = topk.select_topk(v, 3)
    assert idx.tolist() == [1, 3, 5]
    gaps = topk.encode_gaps(idx)
    assert gaps.dtype == np.dtype("<u4") and gaps.tolist() == [1, 2, 2]
    back = topk.decode_gaps(gaps, v.size)
    assert back.tolist() == [1, 3, 5]
    assert topk.scatter(back, v[back], v.size).tolist() == [0, -5, 0, 3, 0, 4]


@pytest.mark.parametrize("gaps", [[1, 0], [2, 3, 10], [7]])
def test_bad_gaps_are_refused(gaps: list[int]) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        topk.decode_gaps(np.array(gaps, dtype="<u4"), 7)
    assert err.value.reason == "bad_encoding"


def test_topk_count_is_at_least_one_and_exact_for_round_fractions() -> None:
    assert topk_count(10_000, 0.01) == 100
    assert topk_count(932, 0.01) == 10
    assert topk_count(5, 0.01) == 1
    assert topk_count(5, 1.0) == 5
    assert topk_count(0, 0.5) == 0


def test_stochastic_int8_is_unbiased() -> None:
    rng = np.random.default_rng(1234)
    x = rng.normal(0, 1, 64).astype(np.float32)
    x[0] = 4.0  # fixes the scale at 4/127 so most values fall between codes
    lengths = np.array([64])
    trials = 4000
    total = np.zeros(64, dtype=np.float64)
    for _ in range(trials):
        codes, scales = quantize.quantize_stochastic(x, lengths, rng)
        total += quantize.dequantize(codes, scales, lengths)
    mean = total / trials
    step = 4.0 / 127
    # each trial's error is within one step with std <= step/2: the mean's std <= step/(2*sqrt(trials))
    assert np.max(np.abs(mean - x)) < 5 * step / (2 * np.sqrt(trials))
    # and the rounding really is random: nearest rounding would have a bias of up to step/2
    codes, scales = quantize.quantize_stochastic(x, lengths, rng)
    assert np.max(np.abs(quantize.dequantize(codes, scales, lengths) - x)) <= step * 1.0001


def test_int8_per_chunk_scales_and_zero_segments() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate([np.zeros(4), np.full(4, 100.0), np.full(2, 0.01)]).astype(np.float32)
    lengths = quantize.chunk_lengths(x.size, 4)
    assert lengths.tolist() == [4, 4, 2]
    codes, scales = quantize.quantize_stochastic(x, lengths, rng)
    assert codes.dtype == np.int8 and int(np.abs(codes.astype(int)).max()) <= 127
    assert scales[0] == 0 and scales[1] == pytest.approx(100 / 127) and scales[2] == pytest.approx(0.01 / 127)
    np.testing.assert_allclose(quantize.dequantize(codes, scales, lengths), x, rtol=1e-5)


def test_dequantize_refuses_bad_scales() -> None:
    with pytest.raises(RemoteProtocolError):
        quantize.dequantize(np.zeros(2, np.int8), np.array([np.inf], np.float32), np.array([2]))
    with pytest.raises(RemoteProtocolError):
        quantize.dequantize(np.zeros(2, np.int8), np.array([-1.0], np.float32), np.array([2]))


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_entropy_round_trip(codec: str) -> None:
    data = bytes(range(256)) * 40
    packed = entropy.compress(data, codec)
    assert len(packed) < len(data) // 4
    assert entropy.decompress(packed, codec, len(data)) == data
    with pytest.raises(RemoteProtocolError) as err:
        entropy.decompress(packed, codec, len(data) + 1)
    assert err.value.reason == "bad_length"


@pytest.mark.parametrize("codec", ["zstd", "zlib"])
def test_decompression_bomb_is_refused_within_the_expected_size(codec: str) -> None:
    bomb_size = 64 * 1024 * 1024  # 64 MiB of zeros...
    chunk = b"\0" * (1 << 20)
    if codec == "zstd":
        zobj = zstandard.ZstdCompressor(level=1).compressobj()
        bomb = b"".join(zobj.compress(chunk) for _ in range(bomb_size >> 20)) + zobj.flush()
    else:
        cobj = zlib.compressobj(9)
        bomb = b"".join(cobj.compress(chunk) for _ in range(bomb_size >> 20)) + cobj.flush()
    assert len(bomb) < 100_000  # ...in a message the size limits let through
    with pytest.raises(RemoteProtocolError) as err:
        entropy.decompress(bomb, codec, 4000)
    assert err.value.reason == "too_large"


def test_corrupt_compressed_data_is_a_peer_error() -> None:
    for codec in ("zstd", "zlib"):
        with pytest.raises(RemoteProtocolError) as err:
            entropy.decompress(b"not compressed at all", codec, 100)
        assert err.value.reason in ("bad_encoding", "bad_length")


@pytest.mark.parametrize(
    "stages",
    [("gzip",), ("int8", "topk:0.1"), ("zstd", "zstd"), ("topk:0",), ("topk:1.5",), ("topk:x",),
     ("int8:0",), ("zstd:3",), ("clip:-1",), ("noise:nan",)],
)
def test_bad_stage_strings_are_refused(stages: tuple[str, ...]) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        parse_stages(stages)
    assert err.value.reason == "bad_encoding"


def test_stage_plan_and_layout() -> None:
    plan = parse_stages(("clip:1.0", "noise:0.8", "topk:0.01", "int8", "zstd"))
    assert (plan.clip_norm, plan.noise_multiplier, plan.topk_fraction, plan.int8, plan.entropy) == (
        1.0, 0.8, 0.01, True, "zstd")
    layout = flat_layout(plan, ((100, 50), (50,)))
    assert [(dt.str, n) for dt, n in layout] == [("<u4", 51), ("|i1", 51), ("<f4", 2)]
    chunked = flat_layout(parse_stages(("int8:64",)), ((100,),))
    assert [(dt.str, n) for dt, n in chunked] == [("|i1", 100), ("<f4", 2)]


def _model(rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.normal(0, 0.5, (6, 4)).astype(np.float32), rng.normal(0, 0.01, 4).astype(np.float32)]


def test_downlink_fp32_and_int8() -> None:
    rng = np.random.default_rng(3)
    params = _model(rng)
    shapes = ((6, 4), (4,))
    fp = encode_model(params, "fp32")
    back = decode_model(fp.encoding, fp.tensors, fp.scales, shapes)
    assert all(np.array_equal(a, b) for a, b in zip(params, back, strict=True))
    q = encode_model(params, "int8")
    assert q.encoding == "int8" and all(t.dtype == "|i1" for t in q.tensors) and len(q.scales) == 2
    back = decode_model(q.encoding, q.tensors, q.scales, shapes)
    for a, b, s in zip(params, back, q.scales, strict=True):
        assert np.max(np.abs(a - b)) <= s / 2 * 1.001  # nearest rounding: half a step
    assert sum(len(t.data) for t in q.tensors) * 4 == sum(len(t.data) for t in fp.tensors)


def test_downlink_delta_against_the_reconstructed_reference_does_not_drift() -> None:
    rng = np.random.default_rng(4)
    shapes = ((6, 4), (4,))
    master = _model(rng)
    first = encode_model(master, "int8")
    held = decode_model(first.encoding, first.tensors, first.scales, shapes)
    for _ in range(20):
        master = [m + rng.normal(0, 0.01, m.shape).astype(np.float32) for m in master]
        msg = encode_model(master, "delta", reference=held)
        held = decode_model(msg.encoding, msg.tensors, msg.scales, shapes, reference=held)
        # error is bounded by half a step of this round's delta, not accumulated
        for m, h, s in zip(master, held, msg.scales, strict=True):
            assert np.max(np.abs(m - h)) <= s / 2 * 1.001 + 1e-7


def test_downlink_refuses_bad_messages() -> None:
    rng = np.random.default_rng(5)
    params = _model(rng)
    shapes = ((6, 4), (4,))
    q = encode_model(params, "int8")
    cases = [
        ("int4", q.tensors, q.scales, shapes, None),
        ("int8", q.tensors, q.scales[:1], shapes, None),
        ("int8", q.tensors, (float("inf"), 1.0), shapes, None),
        ("int8", q.tensors, q.scales, ((4, 6), (4,)), None),
        ("delta", q.tensors, q.scales, shapes, None),
        ("fp32", q.tensors, (), shapes, None),
        ("fp32", (encode_tensor(np.full((6, 4), np.nan, np.float32)), q.tensors[1]), (), shapes, None),
    ]
    for encoding, tensors, scales, shp, ref in cases:
        with pytest.raises(RemoteProtocolError):
            decode_model(encoding, tensors, scales, shp, reference=ref)
