"""Lossless entropy coding of a byte string (zstd, or zlib where zstandard is missing).

Decompression is the classic place for a memory bomb: a few hundred bytes of zstd can claim
gigabytes. The decoder is always told the exact size it expects (the stage layout fixes it)
and reads at most one byte more than that through a streaming reader, so a lying peer costs
at most ``expected + 1`` bytes of memory before it is refused.
"""

from __future__ import annotations

import zlib
from types import ModuleType

from fedcore.errors import RemoteProtocolError

_zstd: ModuleType | None
try:  # zstandard is a declared dependency, but a stripped gateway image may lack it
    import zstandard as _zstd
except ImportError:  # pragma: no cover - exercised only on images without zstandard
    _zstd = None

ZSTD_LEVEL = 10
ZLIB_LEVEL = 9


def zstd_available() -> bool:
    return _zstd is not None


def choose_codec(requested: str) -> str:
    """The codec actually used for a requested one: zstd falls back to zlib if missing."""
    if requested == "zstd" and _zstd is None:
        return "zlib"
    return requested


def compress(data: bytes, codec: str) -> bytes:
    if codec == "zstd":
        if _zstd is None:
            raise RuntimeError("zstandard is not installed; use choose_codec() first")
        return bytes(_zstd.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    if codec == "zlib":
        return zlib.compress(data, ZLIB_LEVEL)
    raise ValueError(f"unknown codec {codec!r}")


def decompress(data: bytes, codec: str, expected_size: int) -> bytes:
    """Decompress a peer's bytes that must expand to exactly ``expected_size`` bytes."""
    if codec == "zstd":
        if _zstd is None:
            raise RemoteProtocolError("bad_encoding", "zstd is not available here; send zlib")
        try:
            with _zstd.ZstdDecompressor().stream_reader(data) as reader:
                out = bytes(reader.read(expected_size + 1))
        except _zstd.ZstdError as exc:
            raise RemoteProtocolError("bad_encoding", f"zstd: {exc}") from None
    elif codec == "zlib":
        d = zlib.decompressobj()
        try:
            out = d.decompress(data, expected_size + 1)
        except zlib.error as exc:
            raise RemoteProtocolError("bad_encoding", f"zlib: {exc}") from None
        if len(out) == expected_size and not d.eof:
            raise RemoteProtocolError("too_large", "zlib stream continues past the expected size")
    else:
        raise RemoteProtocolError("bad_encoding", f"unknown codec {codec!r}")
    if len(out) > expected_size:
        raise RemoteProtocolError("too_large", f"{codec} data expands beyond {expected_size} bytes")
    if len(out) < expected_size:
        raise RemoteProtocolError("bad_length", f"{codec} data gives {len(out)} bytes, expected {expected_size}")
    return out
