"""Top-k sparsification of a flat vector, with gap-coded indices.

Only the ``k`` entries of largest magnitude travel; the rest is left behind and, with error
feedback (``fedcore.pipeline``), added to the next round's update so nothing is lost for good,
only delayed. Indices are sent sorted and *gap-coded* (first index, then differences) as
uint32: gaps are small numbers whose high bytes are zero, which the entropy coder removes.

Decoding validates everything a peer could get wrong: gaps must give strictly increasing
indices inside the vector.
"""

from __future__ import annotations

import numpy as np

from fedcore.errors import RemoteProtocolError


def select_topk(vector: np.ndarray, k: int) -> np.ndarray:
    """Sorted indices (int64) of the ``k`` largest-magnitude entries of ``vector``."""
    n = vector.size
    if k >= n:
        return np.arange(n, dtype=np.int64)
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    # argpartition is O(n); only the k kept indices are then sorted
    idx = np.argpartition(np.abs(vector), n - k)[n - k :]
    return np.sort(idx).astype(np.int64)


def encode_gaps(indices: np.ndarray) -> np.ndarray:
    """Sorted indices -> uint32 gaps (first index, then successive differences)."""
    if indices.size and int(indices[-1]) > np.iinfo(np.uint32).max:
        raise ValueError("index does not fit in uint32")
    return np.diff(indices, prepend=0).astype("<u4")


def decode_gaps(gaps: np.ndarray, n: int) -> np.ndarray:
    """uint32 gaps -> int64 indices; refuses repeated, unsorted or out-of-range indices."""
    g = gaps.astype(np.int64)
    if g.size > 1 and int(g[1:].min()) < 1:
        raise RemoteProtocolError("bad_encoding", "top-k indices repeat or are not sorted")
    indices = np.cumsum(g)
    if indices.size and int(indices[-1]) >= n:
        raise RemoteProtocolError("bad_encoding", f"top-k index {int(indices[-1])} outside {n} values")
    return indices


def scatter(indices: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """Dense float32 vector of length ``n`` with ``values`` at ``indices``."""
    out = np.zeros(n, dtype=np.float32)
    out[indices] = values
    return out
