"""Model parameters as an ordered list of float32 arrays (weights and biases, layer by layer).

Everything that moves or fuses models (deltas, fusion rules, compression, DP) works on this
one representation: ``Params = list[np.ndarray]``; ``flatten``/``unflatten`` convert to one
vector for rules that want it (norms, Krum, cosine similarity).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Params = list[np.ndarray]
Shapes = tuple[tuple[int, ...], ...]


def shapes_of(params: Sequence[np.ndarray]) -> Shapes:
    return tuple(tuple(int(d) for d in p.shape) for p in params)


def flatten(params: Sequence[np.ndarray]) -> np.ndarray:
    if not params:
        return np.zeros(0, dtype=np.float32)
    return np.concatenate([np.asarray(p, dtype=np.float32).ravel() for p in params])


def unflatten(vector: np.ndarray, shapes: Shapes) -> Params:
    out: Params = []
    offset = 0
    for shape in shapes:
        size = int(np.prod(shape)) if shape else 1
        out.append(vector[offset : offset + size].reshape(shape).astype(np.float32, copy=False))
        offset += size
    if offset != vector.size:
        raise ValueError(f"vector of {vector.size} values does not fit shapes {shapes}")
    return out


def subtract(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Params:
    return [np.asarray(x, np.float32) - np.asarray(y, np.float32) for x, y in zip(a, b, strict=True)]


def add(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> Params:
    return [np.asarray(x, np.float32) + np.asarray(y, np.float32) for x, y in zip(a, b, strict=True)]


def scale(a: Sequence[np.ndarray], factor: float) -> Params:
    return [np.asarray(x, np.float32) * np.float32(factor) for x in a]


def l2_norm(params: Sequence[np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(p, dtype=np.float64))) for p in params)))


def num_parameters(params: Sequence[np.ndarray]) -> int:
    return sum(int(p.size) for p in params)
