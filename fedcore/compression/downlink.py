"""Downlink encodings of the global model: fp32, int8, or an int8 delta against a reference.

The aggregator always keeps the float master; what travels is one of

- ``"fp32"``: one float32 tensor per layer (exact);
- ``"int8"``: one int8 tensor per layer with one scale per tensor (``GlobalModel.scales``),
  round-to-nearest, so every gateway and the aggregator reconstruct the same weights;
- ``"delta"``: int8 of ``params - reference`` per layer, where ``reference`` is the model
  the gateways already hold. Deltas are small, so their int8 step is fine.

Rounding here is deterministic (no rng): the reconstruction must be a function of the
message alone, so that the aggregator can compute exactly what the gateways hold. For
``"delta"`` the reference must be that reconstruction (``decode_model`` of the previous
message), not the float master: then each message also carries the previous rounding
error and errors never accumulate. A gateway whose model is not the reference (it missed
a version, see ``GlobalModel.parent_hash``) must fetch a full model instead.

The functions are pure; the runtime owner puts ``EncodedModel`` fields into ``GlobalModel``
(``tensors``, ``encoding``, ``scales``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params, Shapes
from fedcore.protocol.tensors import Tensor, decode_tensor, encode_tensor

MODES = ("fp32", "int8", "delta")
QMAX = 127


@dataclass(frozen=True, slots=True)
class EncodedModel:
    encoding: str
    tensors: tuple[Tensor, ...]
    scales: tuple[float, ...] = ()


def _quantize_nearest(a: np.ndarray) -> tuple[np.ndarray, float]:
    amax = float(np.max(np.abs(a))) if a.size else 0.0
    scale = float(np.float32(amax / QMAX))
    if scale == 0.0:
        return np.zeros(a.shape, dtype=np.int8), 0.0
    q = np.clip(np.rint(a / np.float32(scale)), -QMAX, QMAX).astype(np.int8)
    return q, scale


def encode_model(
    params: Sequence[np.ndarray], mode: str = "fp32", reference: Sequence[np.ndarray] | None = None
) -> EncodedModel:
    """Encode the global model for the downlink (``mode`` in :data:`MODES`)."""
    arrays = [np.asarray(p, dtype=np.float32) for p in params]
    if mode == "fp32":
        return EncodedModel("fp32", tuple(encode_tensor(a) for a in arrays))
    if mode == "delta":
        if reference is None or [r.shape for r in reference] != [a.shape for a in arrays]:
            raise ValueError("delta encoding needs a reference model of the same shapes")
        arrays = [a - np.asarray(r, np.float32) for a, r in zip(arrays, reference, strict=True)]
    elif mode != "int8":
        raise ValueError(f"unknown downlink mode {mode!r}; use one of {MODES}")
    quantized = [_quantize_nearest(a) for a in arrays]
    return EncodedModel(mode, tuple(encode_tensor(q) for q, _ in quantized), tuple(s for _, s in quantized))


def decode_model(
    encoding: str,
    tensors: Sequence[Tensor],
    scales: Sequence[float],
    expected_shapes: Shapes,
    reference: Sequence[np.ndarray] | None = None,
) -> Params:
    """A model message (from the aggregator) back to float32 Params, validated and bounded."""
    expected = tuple(tuple(int(d) for d in s) for s in expected_shapes)
    if len(tensors) != len(expected):
        raise RemoteProtocolError("bad_shape", f"{len(tensors)} tensors for {len(expected)} layers")
    if encoding not in MODES:
        raise RemoteProtocolError("bad_encoding", f"unknown model encoding {encoding!r}")
    want = "<f4" if encoding == "fp32" else "|i1"
    out: Params = []
    if encoding != "fp32":
        if len(scales) != len(expected):
            raise RemoteProtocolError("bad_encoding", f"{len(scales)} scales for {len(expected)} tensors")
        f32_max = float(np.finfo(np.float32).max)
        if not all(math.isfinite(s) and 0 <= s <= f32_max for s in scales):
            raise RemoteProtocolError("bad_encoding", "scales must be finite float32 values >= 0")
    if encoding == "delta":
        if reference is None or tuple(tuple(r.shape) for r in reference) != expected:
            raise RemoteProtocolError("no_reference", "delta model but no matching reference model here")
    for i, (t, shape) in enumerate(zip(tensors, expected, strict=True)):
        if t.dtype != want or tuple(t.shape) != shape:
            raise RemoteProtocolError("bad_shape", f"tensor {i} is {t.dtype}{tuple(t.shape)}, expected {want}{shape}")
        arr = decode_tensor(t, max_elements=math.prod(shape))
        if encoding == "fp32":
            out.append(np.array(arr, dtype=np.float32))
            continue
        values = arr.astype(np.float32) * np.float32(scales[i])
        if encoding == "delta":
            assert reference is not None
            values = np.asarray(reference[i], np.float32) + values
        out.append(values)
    if not all(np.isfinite(p).all() for p in out):
        raise RemoteProtocolError("not_finite", "decoded model holds NaN or infinity")
    return out
