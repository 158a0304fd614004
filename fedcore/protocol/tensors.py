"""Tensors on the wire: raw little-endian bytes with dtype and shape, never pickle.

Decoding is bounded: the dtype must be on an allow-list, the shape must be small and
non-negative, the element count must stay under a limit given by the caller, and the byte
length must match exactly. Float tensors may be required to be finite.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import msgspec
import numpy as np

from fedcore.errors import RemoteProtocolError

# Wire dtype string -> numpy dtype. Little-endian only; no object or structured types.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    "<f4": np.dtype("<f4"),
    "<f2": np.dtype("<f2"),
    "<f8": np.dtype("<f8"),
    "|i1": np.dtype("i1"),
    "|u1": np.dtype("u1"),
    "<i2": np.dtype("<i2"),
    "<i4": np.dtype("<i4"),
    "<u4": np.dtype("<u4"),
    "<i8": np.dtype("<i8"),
}
MAX_DIMS = 8
DEFAULT_MAX_ELEMENTS = 16 * 1024 * 1024


class Tensor(msgspec.Struct, frozen=True, array_like=True):
    dtype: str
    shape: tuple[int, ...]
    data: bytes


def encode_tensor(array: np.ndarray) -> Tensor:
    arr = np.asarray(array)
    dt = arr.dtype.newbyteorder("<") if arr.dtype.byteorder == ">" else arr.dtype
    wire = dt.str if dt.itemsize > 1 else "|" + dt.str[1:]
    if wire not in ALLOWED_DTYPES:
        raise TypeError(f"dtype {arr.dtype} cannot travel on the wire")
    return Tensor(wire, tuple(int(d) for d in arr.shape), np.ascontiguousarray(arr, dtype=dt).tobytes())


def decode_tensor(
    t: Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS, require_finite: bool = True
) -> np.ndarray:
    """Turn an untrusted :class:`Tensor` into a numpy array, or raise RemoteProtocolError."""
    dtype = ALLOWED_DTYPES.get(t.dtype)
    if dtype is None:
        raise RemoteProtocolError("bad_dtype", f"dtype {t.dtype!r} is not allowed")
    if len(t.shape) > MAX_DIMS:
        raise RemoteProtocolError("bad_shape", f"{len(t.shape)} dimensions (max {MAX_DIMS})")
    if any(d < 0 for d in t.shape):
        raise RemoteProtocolError("bad_shape", f"negative dimension in {t.shape}")
    if any(d > max_elements for d in t.shape):
        # Checked per dimension too: (0, 2**63) has no elements yet numpy cannot reshape to it.
        raise RemoteProtocolError("too_large", f"dimension in {t.shape} over {max_elements}")
    count = math.prod(t.shape)
    if count > max_elements:
        raise RemoteProtocolError("too_large", f"{count} elements (max {max_elements})")
    if count * dtype.itemsize != len(t.data):
        raise RemoteProtocolError(
            "bad_length", f"shape {t.shape} of {t.dtype} needs {count * dtype.itemsize} bytes, got {len(t.data)}"
        )
    arr = np.frombuffer(t.data, dtype=dtype).reshape(t.shape)
    if require_finite and dtype.kind == "f" and not np.isfinite(arr).all():
        raise RemoteProtocolError("not_finite", "tensor holds NaN or infinity")
    return arr


def encode_tensors(arrays: Sequence[np.ndarray]) -> tuple[Tensor, ...]:
    return tuple(encode_tensor(a) for a in arrays)


def decode_tensors(
    tensors: Sequence[Tensor],
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    require_finite: bool = True,
) -> list[np.ndarray]:
    """Decode several tensors with one shared element budget."""
    out: list[np.ndarray] = []
    budget = max_elements
    for t in tensors:
        arr = decode_tensor(t, budget, require_finite)
        budget -= arr.size
        out.append(arr)
    return out
