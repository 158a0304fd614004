"""Stochastic int8 quantization with one scale per segment (a layer or a fixed-size chunk).

For a segment with largest magnitude ``a`` the scale is ``s = a / 127`` and each value ``x``
becomes ``q = floor(x / s + u)`` with ``u ~ U[0, 1)``, so ``q`` is ``floor(x/s)`` or one more,
with probabilities that make ``E[q * s] == x``: the rounding is *unbiased*, and averaging many
gateways' updates averages the rounding error away instead of accumulating a bias. The
random numbers come from the caller's ``numpy.random.Generator``. ``|x / s| <= 127`` keeps
``q`` in [-127, 127]; -128 is never used, so the code is symmetric.

Segments: ``segment_lengths`` partitions the value vector (per-layer scales, or per chunk
for better precision when one layer mixes large and small values). A segment of zeros gets
scale 0 and decodes to zeros.
"""

from __future__ import annotations

import numpy as np

from fedcore.errors import RemoteProtocolError

QMAX = 127


def chunk_lengths(num_values: int, chunk: int) -> np.ndarray:
    """Segment lengths for fixed-size chunks (the last chunk may be shorter)."""
    if num_values == 0:
        return np.zeros(0, dtype=np.int64)
    lengths = np.full(-(-num_values // chunk), chunk, dtype=np.int64)
    lengths[-1] = num_values - chunk * (lengths.size - 1)
    return lengths


def segment_scales(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """float32 scale per segment: max |value| / 127 (0 for an empty or all-zero segment)."""
    scales = np.zeros(lengths.size, dtype=np.float32)
    nonempty = lengths > 0
    if values.size:
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
        maxima = np.maximum.reduceat(np.abs(values), starts[nonempty])
        scales[nonempty] = (maxima / np.float32(QMAX)).astype(np.float32)
    return scales


def quantize_stochastic(
    values: np.ndarray, lengths: np.ndarray, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """float32 values -> (int8 codes, float32 scales), unbiased stochastic rounding."""
    v = np.asarray(values, dtype=np.float32)
    scales = segment_scales(v, lengths)
    per_value = np.repeat(scales, lengths)
    safe = np.where(per_value > 0, per_value, np.float32(1.0))
    scaled = v / safe
    q = np.floor(scaled + rng.random(v.size, dtype=np.float32))
    return np.clip(q, -QMAX, QMAX).astype(np.int8), scales


_F32_MAX = float(np.finfo(np.float32).max)


def dequantize(codes: np.ndarray, scales: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """(int8 codes, scales) -> float32 values. Scales come from a peer: checked first."""
    if not np.isfinite(scales).all() or (scales < 0).any() or (scales > _F32_MAX).any():
        raise RemoteProtocolError("bad_encoding", "int8 scales must be finite float32 values >= 0")
    if int(lengths.sum()) != codes.size:
        raise RemoteProtocolError("bad_encoding", "int8 segments do not cover the values")
    return codes.astype(np.float32) * np.repeat(scales.astype(np.float32), lengths)
