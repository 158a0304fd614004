"""The gateway's encode_update and the aggregator's decode_update, together and apart."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import numpy as np
import pytest
import zstandard

from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import flatten, l2_norm, shapes_of
from fedcore.pipeline import EdgePipelineState, decode_update, encode_update, make_encoder
from fedcore.protocol.codec import Limits
from fedcore.protocol.messages import EncodedDelta, ModelUpdate, PipelineConfig
from fedcore.protocol.tensors import Tensor, encode_tensor

SHAPES = ((12, 16), (16,), (16, 3), (3,))


def delta(rng: np.random.Generator, scale: float = 0.1) -> list[np.ndarray]:
    return [rng.normal(0, scale, s).astype(np.float32) for s in SHAPES]


def roundtrip(comp: tuple[str, ...], rng: np.random.Generator, **kw: float) -> tuple[list[np.ndarray], list[np.ndarray]]:
    d = delta(rng)
    enc, _ = encode_update(d, PipelineConfig(compression=comp, **kw), EdgePipelineState(), rng)
    wire = msgspec.msgpack.decode(msgspec.msgpack.encode(enc), type=EncodedDelta)
    return d, decode_update(wire, SHAPES)


def test_raw_round_trip_is_exact_and_uses_the_baseline_layout() -> None:
    rng = np.random.default_rng(0)
    d = delta(rng)
    enc, info = encode_update(d, PipelineConfig(), EdgePipelineState(), rng)
    assert enc.stages == () and len(enc.parts) == len(SHAPES)
    assert all(t.dtype == "<f4" for t in enc.parts)
    out = decode_update(enc, SHAPES)
    assert all(np.array_equal(a, b) for a, b in zip(d, out, strict=True))
    assert info.fp32_bytes == 4 * sum(a.size for a in d) and info.wire_bytes > info.fp32_bytes


@pytest.mark.parametrize(
    "comp",
    [("zstd",), ("zlib",), ("int8",), ("int8:16",), ("int8", "zstd"), ("topk:1.0",),
     ("topk:0.1",), ("topk:0.1", "int8"), ("topk:0.01", "int8", "zstd"), ("topk:0.05", "int8:8", "zlib")],
)
def test_every_mix_round_trips_within_its_error(comp: tuple[str, ...]) -> None:
    rng = np.random.default_rng(1)
    d, out = roundtrip(comp, rng)
    assert [a.shape for a in out] == [a.shape for a in d] and all(a.dtype == np.float32 for a in out)
    flat_in, flat_out = flatten(d), flatten(out)
    lossless = not any(s.startswith(("topk", "int8")) for s in comp) or comp == ("topk:1.0",)
    if lossless:
        assert np.array_equal(flat_in, flat_out)
    if any(s.startswith("int8") for s in comp):
        nonzero = flat_out != 0
        assert np.max(np.abs(flat_in - flat_out)[nonzero]) <= np.max(np.abs(flat_in)) / 127 * 1.001
    if comp[0].startswith("topk"):
        fraction = float(comp[0].split(":")[1])
        kept = np.count_nonzero(flat_out)
        assert kept <= max(1, round(fraction * flat_in.size))
        # the kept entries are the largest ones
        if kept and fraction < 1:
            assert np.min(np.abs(flat_in[flat_out != 0])) >= np.sort(np.abs(flat_in))[-kept - 1] - 1e-6


def test_clip_and_noise_are_recorded_in_the_stages() -> None:
    rng = np.random.default_rng(2)
    enc, info = encode_update(
        delta(rng, scale=1.0),
        PipelineConfig(clip_norm=1.0, noise_multiplier=0.8, compression=("topk:0.01", "int8", "zstd")),
        EdgePipelineState(), rng,
    )
    assert enc.stages == ("clip:1.0", "noise:0.8", "topk:0.01", "int8", "zstd")
    assert info.clipped and info.pre_clip_norm > 1.0
    decode_update(enc, SHAPES)


def test_clipping_bounds_the_decoded_update_without_noise() -> None:
    rng = np.random.default_rng(3)
    d = delta(rng, scale=5.0)
    enc, info = encode_update(d, PipelineConfig(clip_norm=2.0), EdgePipelineState(), rng)
    assert info.clipped and info.pre_clip_norm == pytest.approx(l2_norm(d), rel=1e-6)
    assert l2_norm(decode_update(enc, SHAPES)) <= 2.0


def test_noise_in_the_pipeline_has_std_z_times_c() -> None:
    rng = np.random.default_rng(4)
    zero = [np.zeros(s, np.float32) for s in ((300, 300),)]
    enc, _ = encode_update(zero, PipelineConfig(clip_norm=0.5, noise_multiplier=1.2), EdgePipelineState(), rng)
    out = decode_update(enc, ((300, 300),))[0]
    assert float(np.std(out)) == pytest.approx(0.6, rel=0.02)


@pytest.mark.parametrize("comp", [("topk:0.05",), ("topk:0.02", "int8", "zstd"), ("int8",)])
def test_error_feedback_loses_nothing(comp: tuple[str, ...]) -> None:
    rng = np.random.default_rng(5)
    state = EdgePipelineState()
    total_delta = np.zeros(sum(int(np.prod(s)) for s in SHAPES), np.float64)
    total_sent = np.zeros_like(total_delta)
    for _ in range(15):
        d = delta(rng)
        enc, info = encode_update(d, PipelineConfig(compression=comp), state, rng)
        total_delta += flatten(d)
        total_sent += flatten(decode_update(enc, SHAPES))
        assert info.residual_norm == pytest.approx(state.residual_norm())
    assert state.residual is not None and state.residual_norm() > 0
    np.testing.assert_allclose(total_sent + state.residual, total_delta, atol=1e-4)


def test_residual_is_flushed_when_compression_is_turned_off_and_reset_on_new_shapes() -> None:
    rng = np.random.default_rng(6)
    state = EdgePipelineState()
    d1, d2 = delta(rng), delta(rng)
    e1, _ = encode_update(d1, PipelineConfig(compression=("topk:0.1",)), state, rng)
    e2, _ = encode_update(d2, PipelineConfig(), state, rng)
    assert state.residual is None
    sent = flatten(decode_update(e1, SHAPES)) + flatten(decode_update(e2, SHAPES))
    np.testing.assert_allclose(sent, flatten(d1) + flatten(d2), atol=1e-6)
    encode_update(d1, PipelineConfig(compression=("topk:0.1",)), state, rng)
    other = [np.ones((3, 3), np.float32)]
    enc, _ = encode_update(other, PipelineConfig(), state, rng)
    assert np.array_equal(decode_update(enc, ((3, 3),))[0], other[0])  # no stale residual added


def test_stats_do_not_leak_clear_values_under_dp() -> None:
    rng = np.random.default_rng(7)
    cfg = PipelineConfig(clip_norm=1.0, noise_multiplier=1.0, adaptive_clip_quantile=0.5)
    _, info = encode_update(delta(rng, 1.0), cfg, EdgePipelineState(), rng)
    stats = info.as_stats()
    assert set(stats) == {"update_bytes", "clip_indicator"}
    assert stats["clip_indicator"] not in (0.5, -0.5)  # noised
    _, info = encode_update(delta(rng, 1.0), PipelineConfig(clip_norm=1.0, adaptive_clip_quantile=0.5),
                            EdgePipelineState(), rng)
    stats = info.as_stats()
    assert stats["clipped"] == 1.0 and stats["clip_indicator"] == -0.5 and stats["pre_clip_norm"] > 1


def test_make_encoder_fits_the_participant_and_the_update_message() -> None:
    rng = np.random.default_rng(8)
    encode = make_encoder(EdgePipelineState(), rng)
    enc, stats = encode(delta(rng), PipelineConfig(compression=("int8", "zstd")))
    update = ModelUpdate(round=1, base_version=0, num_samples=10, delta=enc,
                         clipped=bool(stats.get("clipped", 0.0)), stats=stats)
    back = msgspec.msgpack.decode(msgspec.msgpack.encode(update), type=ModelUpdate)
    assert len(decode_update(back.delta, SHAPES)) == len(SHAPES)


@pytest.mark.parametrize(
    "config",
    [PipelineConfig(compression=("gzip",)), PipelineConfig(compression=("clip:1.0",)),
     PipelineConfig(noise_multiplier=1.0), PipelineConfig(clip_norm=float("nan")),
     PipelineConfig(clip_norm=1.0, adaptive_clip_quantile=1.5)],
)
def test_a_bad_announced_pipeline_is_refused(config: PipelineConfig) -> None:
    rng = np.random.default_rng(9)
    with pytest.raises(RemoteProtocolError) as err:
        encode_update(delta(rng), config, EdgePipelineState(), rng)
    assert err.value.reason == "bad_pipeline"


def test_a_non_finite_local_delta_is_not_sent() -> None:
    rng = np.random.default_rng(9)
    d = delta(rng)
    d[1][0] = np.nan
    with pytest.raises(ValueError):
        encode_update(d, PipelineConfig(), EdgePipelineState(), rng)


def _encoded(comp: tuple[str, ...]) -> EncodedDelta:
    rng = np.random.default_rng(10)
    return encode_update(delta(rng), PipelineConfig(compression=comp), EdgePipelineState(), rng)[0]


def _refused(enc: EncodedDelta, shapes: tuple[tuple[int, ...], ...] = SHAPES, limits: Limits | None = None) -> str:
    with pytest.raises(RemoteProtocolError) as err:
        decode_update(enc, shapes, limits or Limits())
    return err.value.reason


def test_unknown_stage_and_wrong_shapes_are_refused() -> None:
    enc = _encoded(("int8",))
    assert _refused(EncodedDelta(("int8", "rot13"), enc.shapes, enc.parts)) == "bad_encoding"
    assert _refused(enc, ((12, 16), (16,), (16, 4), (4,))) == "bad_shape"
    assert _refused(EncodedDelta(enc.stages, ((12, 16),), enc.parts)) == "bad_shape"
    raw = _encoded(())
    assert _refused(EncodedDelta((), raw.shapes, raw.parts[:-1])) == "bad_shape"
    swapped = (raw.parts[1], raw.parts[0], *raw.parts[2:])
    assert _refused(EncodedDelta((), raw.shapes, swapped)) == "bad_shape"
    assert _refused(raw, SHAPES, Limits(max_elements=10)) == "too_large"


def test_parts_that_do_not_match_the_stage_layout_are_refused() -> None:
    enc = _encoded(("topk:0.1", "int8"))
    gaps, codes, scales = enc.parts
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (gaps, codes))) == "bad_encoding"
    as_float = encode_tensor(np.zeros(codes.shape, np.float32))
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (gaps, as_float, scales))) == "bad_encoding"
    longer = Tensor(codes.dtype, (codes.shape[0] + 1,), codes.data + b"\0")
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (gaps, longer, scales))) == "bad_encoding"
    bad_scales = encode_tensor(np.full(scales.shape, np.inf, np.float32))
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (gaps, codes, bad_scales))) == "bad_encoding"
    out_of_range = encode_tensor(np.array([10_000] + [1] * (gaps.shape[0] - 1), "<u4"))
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (out_of_range, codes, scales))) == "bad_encoding"


def test_non_finite_values_are_refused() -> None:
    enc = _encoded(("topk:0.1",))
    values = np.full(enc.parts[1].shape, np.nan, np.float32)
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (enc.parts[0], encode_tensor(values)))) == "not_finite"


def test_a_zstd_bomb_inside_an_update_is_refused() -> None:
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    bomb = b"".join(cobj.compress(b"\0" * (1 << 20)) for _ in range(64)) + cobj.flush()
    part = encode_tensor(np.frombuffer(bomb, np.uint8))
    assert _refused(EncodedDelta(("int8", "zstd"), SHAPES, (part,))) == "too_large"
    enc = _encoded(("int8", "zstd"))
    assert _refused(EncodedDelta(enc.stages, enc.shapes, (*enc.parts, enc.parts[0]))) == "bad_encoding"


def test_compression_shrinks_the_update() -> None:
    rng = np.random.default_rng(12)
    sizes = {}
    for comp in [(), ("int8",), ("topk:0.01", "int8", "zstd")]:
        _, info = encode_update(delta(rng), PipelineConfig(compression=comp), EdgePipelineState(), rng)
        sizes[comp] = info.wire_bytes
    assert sizes[("int8",)] < sizes[()] / 3
    assert sizes[("topk:0.01", "int8", "zstd")] < sizes[()] / 10


def test_importing_the_pipeline_does_not_load_scipy_or_the_accountant() -> None:
    code = "import sys, fedcore.pipeline; print(sorted(m for m in ('scipy', 'dp_accounting') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_shapes_of_matches_the_wire_shapes() -> None:
    enc = _encoded(("int8",))
    assert tuple(tuple(s) for s in enc.shapes) == shapes_of(delta(np.random.default_rng(0)))
