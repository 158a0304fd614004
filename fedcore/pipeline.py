"""The update pipeline: what a gateway does to its delta, and how the aggregator undoes it.

Gateway (``encode_update``), in this order::

    delta -> flatten -> clip (L2, C) -> noise (N(0, (z C)^2)) -> + EF residual
          -> top-k -> int8 (stochastic) -> zstd/zlib -> EncodedDelta

Aggregator (``decode_update``): parse stages -> check shapes -> bounded decompress ->
check each part's dtype and length against the layout the stages imply -> dequantize ->
scatter -> finite check -> Params. Any fault is a ``RemoteProtocolError`` naming it.

Why this order. Clip and noise form the Gaussian mechanism; everything after the noise only
sees already-privatised numbers, so compression is post-processing and cannot weaken the
guarantee. Error feedback (EF) keeps what compression dropped (the *residual*) and adds it
to the next round's vector *after that round's noise*: the residual is a function of past
noised vectors only, never of clear data, so carrying it across rounds releases nothing
un-noised (docs/privacy.md has the argument). The price: the residual is not clipped, so a
sent update's norm is not bounded by C; the aggregator's norm validation must allow for
noise and residual.

EF invariant (no clipping): sum of decoded sent updates + current residual == sum of deltas.

Stage strings recorded in the envelope (see ``fedcore.compression.stages``), e.g.
``("clip:1.0", "noise:0.8", "topk:0.01", "int8", "zstd")``. Empty stages mean raw fp32, one
tensor per layer (the contract's baseline). This module imports only numpy, msgspec and the
stdlib codecs: gateways never load the DP accountant (scipy).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import msgspec
import numpy as np

from fedcore.compression.entropy import choose_codec, compress, decompress
from fedcore.compression.quantize import chunk_lengths, dequantize, quantize_stochastic
from fedcore.compression.stages import StagePlan, flat_layout, parse_stages, topk_count
from fedcore.compression.topk import decode_gaps, encode_gaps, scatter, select_topk
from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params, Shapes, flatten, shapes_of, unflatten
from fedcore.privacy.adaptive import gateway_indicator
from fedcore.privacy.clipping import add_gaussian_noise, clip_l2, l2_norm
from fedcore.protocol.codec import Limits
from fedcore.protocol.messages import EncodedDelta, PipelineConfig
from fedcore.protocol.tensors import (
    ALLOWED_DTYPES,
    Tensor,
    decode_tensor,
    decode_tensors,
    encode_tensor,
)

_msgpack = msgspec.msgpack.Encoder()
_DEFAULT_LIMITS = Limits()


@dataclass
class EdgePipelineState:
    """Per-gateway memory between rounds (mutable; owned by the gateway's runtime).

    ``residual``: the flat float32 error-feedback residual for a model of ``shapes``.
    ``last_clip_norm``: the clip norm used last (adaptive clipping moves it between rounds).
    Persisting this state is optional: losing it only loses the not-yet-sent residual.
    """

    residual: np.ndarray | None = None
    shapes: Shapes | None = None
    last_clip_norm: float = 0.0
    rounds_encoded: int = 0

    def residual_norm(self) -> float:
        return 0.0 if self.residual is None else l2_norm(self.residual)

    def reset(self) -> None:
        self.residual, self.shapes = None, None


@dataclass(frozen=True, slots=True)
class UpdateInfo:
    """What the gateway learns while encoding; only :meth:`as_stats` may be published."""

    pre_clip_norm: float
    clipped: bool
    clip_norm: float
    noise_multiplier: float
    wire_bytes: int  # msgpack size of the EncodedDelta
    fp32_bytes: int  # size of the same delta as raw float32
    residual_norm: float  # error-feedback residual left for the next round
    clip_indicator: float | None  # centred (noisy under DP) indicator for adaptive clipping
    stages: tuple[str, ...]

    def as_stats(self) -> dict[str, float]:
        """Values safe to put into ``ModelUpdate`` (``clipped`` goes to its own field).

        Under DP (noise on) the clear pre-clip norm and clipped bit would leak information
        the noise is meant to hide, so they stay on the gateway; the adaptive-clipping
        indicator is sent only in its noised form.
        """
        stats: dict[str, float] = {"update_bytes": float(self.wire_bytes)}
        if self.noise_multiplier <= 0:
            stats["clipped"] = 1.0 if self.clipped else 0.0
            stats["pre_clip_norm"] = self.pre_clip_norm
        if self.clip_indicator is not None:
            stats["clip_indicator"] = self.clip_indicator
        return stats


def _check_config(config: PipelineConfig) -> StagePlan:
    """The announced config (a peer's message) as a plan, or RemoteProtocolError."""
    plan = parse_stages(tuple(config.compression), reason="bad_pipeline")
    if plan.clip_norm or plan.noise_multiplier:
        raise RemoteProtocolError("bad_pipeline", "clip/noise are set by clip_norm/noise_multiplier")
    c, z, q = config.clip_norm, config.noise_multiplier, config.adaptive_clip_quantile
    if not all(math.isfinite(x) and x >= 0 for x in (c, z, q)) or q >= 1:
        raise RemoteProtocolError("bad_pipeline", f"clip_norm={c}, noise_multiplier={z}, quantile={q}")
    if z > 0 and c <= 0:
        raise RemoteProtocolError("bad_pipeline", "noise needs clip_norm > 0")
    return replace(plan, clip_norm=c, noise_multiplier=z, entropy=choose_codec(plan.entropy))


def _stage_strings(plan: StagePlan) -> tuple[str, ...]:
    stages: list[str] = []
    if plan.clip_norm > 0:
        stages.append(f"clip:{plan.clip_norm!r}")
    if plan.noise_multiplier > 0:
        stages.append(f"noise:{plan.noise_multiplier!r}")
    if plan.topk_fraction > 0:
        stages.append(f"topk:{plan.topk_fraction!r}")
    if plan.int8:
        stages.append(f"int8:{plan.int8_chunk}" if plan.int8_chunk else "int8")
    if plan.entropy:
        stages.append(plan.entropy)
    return tuple(stages)


def _segment_lengths(plan: StagePlan, shapes: Shapes, indices: np.ndarray | None, m: int) -> np.ndarray:
    """int8 segments over the m sent values: fixed chunks, or one per layer."""
    if plan.int8_chunk:
        return chunk_lengths(m, plan.int8_chunk)
    sizes = np.array([math.prod(s) for s in shapes], dtype=np.int64)
    if indices is None:
        return sizes
    # per layer among the kept entries: count indices falling in each layer's flat range
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    return np.diff(np.searchsorted(indices, bounds, side="left")).astype(np.int64)


def _compress(
    vec: np.ndarray, plan: StagePlan, shapes: Shapes, rng: np.random.Generator
) -> tuple[list[np.ndarray], np.ndarray]:
    """Flat-layout arrays and the dense vector the aggregator will reconstruct from them."""
    n = vec.size
    arrays: list[np.ndarray] = []
    indices: np.ndarray | None = None
    values = vec
    if plan.topk_fraction > 0:
        indices = select_topk(vec, topk_count(n, plan.topk_fraction))
        arrays.append(encode_gaps(indices))
        values = vec[indices]
    if plan.int8:
        lengths = _segment_lengths(plan, shapes, indices, values.size)
        codes, scales = quantize_stochastic(values, lengths, rng)
        arrays += [codes, scales]
        values = dequantize(codes, scales, lengths)
    else:
        arrays.append(values.astype("<f4"))
    sent = scatter(indices, values, n) if indices is not None else values.astype(np.float32)
    return arrays, sent


def encode_update(
    delta: Params, config: PipelineConfig, state: EdgePipelineState, rng: np.random.Generator
) -> tuple[EncodedDelta, UpdateInfo]:
    """Clip -> noise -> (+ residual) -> compress a gateway's delta; updates ``state``.

    Raises ``RemoteProtocolError("bad_pipeline")`` if the announced config is invalid and
    ``ValueError`` if the delta itself is not finite (a diverged local training).
    """
    plan = _check_config(config)
    shapes = shapes_of(delta)
    vec = flatten(delta)
    if not np.isfinite(vec).all():
        raise ValueError("the local delta holds NaN or infinity; not sending it")
    pre_norm, clipped, indicator = l2_norm(vec), False, None
    if plan.clip_norm > 0:
        vec, _, clipped = clip_l2(vec, plan.clip_norm)
        if config.adaptive_clip_quantile > 0:
            indicator = gateway_indicator(pre_norm, plan.clip_norm, plan.noise_multiplier, rng)
    if plan.noise_multiplier > 0:
        vec = add_gaussian_noise(vec, plan.noise_multiplier, plan.clip_norm, rng)
    # error feedback after the noise: the residual only ever holds privatised values
    if state.residual is not None and state.shapes == shapes:
        vec = vec + state.residual
    state.reset()
    if plan.compressed:
        arrays, sent = _compress(vec, plan, shapes, rng)
        if plan.lossy:
            state.residual, state.shapes = (vec - sent).astype(np.float32), shapes
        if plan.entropy:
            blob = compress(b"".join(a.tobytes() for a in arrays), plan.entropy)
            parts: tuple[Tensor, ...] = (encode_tensor(np.frombuffer(blob, dtype=np.uint8)),)
        else:
            parts = tuple(encode_tensor(a) for a in arrays)
    else:
        parts = tuple(encode_tensor(a) for a in unflatten(vec, shapes))
    state.last_clip_norm = plan.clip_norm
    state.rounds_encoded += 1
    encoded = EncodedDelta(_stage_strings(plan), shapes, parts)
    info = UpdateInfo(
        pre_clip_norm=pre_norm,
        clipped=clipped,
        clip_norm=plan.clip_norm,
        noise_multiplier=plan.noise_multiplier,
        wire_bytes=len(_msgpack.encode(encoded)),
        fp32_bytes=4 * vec.size,
        residual_norm=state.residual_norm(),
        clip_indicator=indicator,
        stages=encoded.stages,
    )
    return encoded, info


EncodeFn = Callable[[Params, PipelineConfig], tuple[EncodedDelta, dict[str, float]]]


def make_encoder(state: EdgePipelineState, rng: np.random.Generator) -> EncodeFn:
    """Bind state and rng into the ``(delta, config) -> (encoded, stats)`` shape the
    gateway's participant state machine takes (``edge.participant.EncodeFn``)."""

    def encode(delta: Params, config: PipelineConfig) -> tuple[EncodedDelta, dict[str, float]]:
        encoded, info = encode_update(delta, config, state, rng)
        return encoded, info.as_stats()

    return encode


# ---- aggregator side ------------------------------------------------------------------


def _flat_arrays(parts: tuple[Tensor, ...], plan: StagePlan, shapes: Shapes, limits: Limits) -> list[np.ndarray]:
    """The parts as arrays of exactly the layout the stages imply (bounded decompression)."""
    layout = flat_layout(plan, shapes)
    if plan.entropy:
        if len(parts) != 1 or parts[0].dtype != "|u1" or len(parts[0].shape) != 1:
            raise RemoteProtocolError("bad_encoding", f"{plan.entropy} expects one uint8 part")
        blob = decode_tensor(parts[0], max_elements=limits.max_message_bytes)
        expected = sum(dt.itemsize * count for dt, count in layout)
        raw = decompress(blob.tobytes(), plan.entropy, expected)
        arrays, offset = [], 0
        for dt, count in layout:
            arrays.append(np.frombuffer(raw, dtype=dt, count=count, offset=offset))
            offset += dt.itemsize * count
        return arrays
    if len(parts) != len(layout):
        raise RemoteProtocolError("bad_encoding", f"{len(parts)} parts, stages imply {len(layout)}")
    arrays = []
    for i, (t, (dt, count)) in enumerate(zip(parts, layout, strict=True)):
        if ALLOWED_DTYPES.get(t.dtype) != dt or tuple(t.shape) != (count,):
            raise RemoteProtocolError(
                "bad_encoding", f"part {i} is {t.dtype}{tuple(t.shape)}, expected {dt.str}({count},)"
            )
        arrays.append(decode_tensor(t, max_elements=count, require_finite=False))
    return arrays


def decode_update(encoded: EncodedDelta, expected_shapes: Shapes, limits: Limits = _DEFAULT_LIMITS) -> Params:
    """Undo a gateway's pipeline: bounded, validated, finite float32 Params of ``expected_shapes``.

    Never allocates more than the expected model (plus the message itself): sizes come
    from the stages and the expected shapes, never from the peer. Fits the aggregator's
    ``DecodeFn`` (``(encoded, shapes) -> Params``).
    """
    plan = parse_stages(encoded.stages)
    try:
        shapes = tuple(tuple(int(d) for d in s) for s in encoded.shapes)
    except (TypeError, ValueError):
        raise RemoteProtocolError("bad_shape", "shapes are not integer tuples") from None
    expected = tuple(tuple(int(d) for d in s) for s in expected_shapes)
    if shapes != expected:
        raise RemoteProtocolError("bad_shape", f"delta shapes {shapes} != model shapes {expected}")
    n = sum(math.prod(s) for s in expected)
    if n > limits.max_elements:
        raise RemoteProtocolError("too_large", f"{n} elements (max {limits.max_elements})")
    if not plan.compressed:
        if len(encoded.parts) != len(expected):
            raise RemoteProtocolError("bad_shape", f"{len(encoded.parts)} tensors for {len(expected)} layers")
        arrays = decode_tensors(encoded.parts, max_elements=n)
        if tuple(a.shape for a in arrays) != expected or any(a.dtype != np.float32 for a in arrays):
            raise RemoteProtocolError("bad_shape", "delta does not match the model's shapes as float32")
        return [np.array(a, dtype=np.float32) for a in arrays]
    arrays = _flat_arrays(encoded.parts, plan, expected, limits)
    pos, indices = 0, None
    if plan.topk_fraction > 0:
        indices = decode_gaps(arrays[0], n)
        pos = 1
    if plan.int8:
        codes, scales = arrays[pos], arrays[pos + 1]
        values = dequantize(codes, scales, _segment_lengths(plan, expected, indices, codes.size))
    else:
        values = arrays[pos].astype(np.float32)
    vec = scatter(indices, values, n) if indices is not None else values
    if not np.isfinite(vec).all():
        raise RemoteProtocolError("not_finite", "decoded delta holds NaN or infinity")
    return unflatten(vec, expected)
