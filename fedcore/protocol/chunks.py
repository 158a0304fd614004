"""Chunked transfer: a message larger than one MQTT packet travels as content-addressed chunks.

Theory of operation
-------------------
Sending (:func:`publications`): a message that fits the topic's payload limit goes out as
today, unchanged. A larger one (its bytes are a complete signed envelope) is cut every
``chunk_size`` bytes; each chunk is named by its SHA-256. A :class:`ChunkManifest` (the
message's kind, size, chunk size, the ordered chunk hashes and the whole message's hash) is
signed in its own envelope and published where the message would have gone; the chunks
follow on the chunk topic(s). A chunk's payload is its raw bytes and nothing else: what it
is, and where it goes, is known only from the signed manifest.

Receiving (:class:`Assembler`): a verified manifest opens an *assembly* for its source (the
sender and the stream it came on; one assembly per source, a newer manifest replaces an
unfinished older one). A chunk is looked up by its hash among the source's assemblies; one
that no manifest names is refused (``unknown_chunk``), so a corrupted or foreign chunk is
never written. Chunks may come in any order and more than once; each is written at its
offset into the assembly's store entry (a file, :mod:`fedcore.chunk_spool`), so memory
holds one chunk at a time. When every chunk is in, the whole message's hash is checked
(``bad_message_hash``) and the bytes go through the normal decode and signature checks.

Bounds: a manifest is refused (``too_large``) above ``max_message_bytes``, ``max_chunks`` or
``max_chunk_bytes``; an assembly that would exceed ``max_assemblies`` or ``max_total_bytes``
held at once is refused (``chunk_capacity``). Resuming: the store keeps each assembly's
manifest next to its bytes, and :meth:`Assembler.restore` rebuilds which chunks are held by
hashing what the store holds, so a restart keeps everything already received.

Pure: no clock, no I/O of its own; the store is passed in.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.protocol.messages import ChunkManifest

HASH_BYTES = 32
_READ_BLOCK = 1 << 20  # the whole-message hash reads the store this much at a time
_REMEMBER_DONE = 8  # finished transfers remembered, so retained re-deliveries are quiet


def chunk_hash(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """What a receiver accepts. Defaults suit a 50 MB model on a Pi-class gateway."""

    max_message_bytes: int = 64 * 1024 * 1024
    max_chunk_bytes: int = 8 * 1024 * 1024
    max_chunks: int = 65536
    max_assemblies: int = 4
    max_total_bytes: int = 128 * 1024 * 1024


# --------------------------------------------------------------------------- sending


@dataclass(frozen=True, slots=True)
class Publication:
    topic: str
    payload: bytes
    retain: bool


def split(message: bytes, chunk_size: int, kind: str) -> tuple[ChunkManifest, list[bytes]]:
    """The manifest and the chunks of ``message``."""
    if chunk_size < 1 or not message:
        raise LocalProtocolError(f"cannot chunk {len(message)} bytes in chunks of {chunk_size}")
    chunks = [message[i:i + chunk_size] for i in range(0, len(message), chunk_size)]
    manifest = ChunkManifest(kind, len(message), chunk_size, tuple(chunk_hash(c) for c in chunks),
                             hashlib.sha256(message).digest())
    return manifest, chunks


def publications(
    payload: bytes,
    kind: str,
    topic: str,
    limit: int,
    chunk_topic: Callable[[bytes], str],
    seal: Callable[[ChunkManifest], bytes],
    retain: bool = False,
) -> list[Publication]:
    """What to publish for one signed message ``payload`` bound for ``topic``.

    Within ``limit``: the payload itself. Larger: the sealed (signed, encoded) manifest on
    ``topic``, then each chunk on ``chunk_topic(hash)``, every chunk at most ``limit``
    bytes. Manifest first, so a live subscriber knows the chunks as they arrive.
    """
    if len(payload) <= limit:
        return [Publication(topic, payload, retain)]
    manifest, chunks = split(payload, limit, kind)
    sealed = seal(manifest)
    if len(sealed) > limit:
        raise LocalProtocolError(
            f"the manifest of {len(payload)} bytes in {len(chunks)} chunks is itself over {limit} bytes"
        )
    out = [Publication(topic, sealed, retain)]
    out += [Publication(chunk_topic(h), c, retain) for h, c in zip(manifest.chunks, chunks, strict=True)]
    return out


# --------------------------------------------------------------------------- receiving


class ChunkStore(Protocol):
    """Where assemblies keep their bytes (a folder of files, or memory in tests)."""

    def create(self, key: str, size: int, record: bytes) -> None:
        """Reserve ``size`` bytes for ``key`` and keep ``record`` (the manifest) with it."""
        ...

    def write(self, key: str, offset: int, data: bytes) -> None: ...

    def read(self, key: str, offset: int, length: int) -> bytes: ...

    def records(self) -> list[tuple[str, bytes]]:
        """Every (key, record) held, for :meth:`Assembler.restore`."""
        ...

    def remove(self, key: str) -> None: ...


class MemoryChunkStore:
    """A :class:`ChunkStore` in memory, for tests of the pure logic."""

    def __init__(self) -> None:
        self.data: dict[str, bytearray] = {}
        self.saved: dict[str, bytes] = {}

    def create(self, key: str, size: int, record: bytes) -> None:
        self.data[key] = bytearray(size)
        self.saved[key] = record

    def write(self, key: str, offset: int, data: bytes) -> None:
        self.data[key][offset:offset + len(data)] = data

    def read(self, key: str, offset: int, length: int) -> bytes:
        return bytes(self.data[key][offset:offset + length])

    def records(self) -> list[tuple[str, bytes]]:
        return sorted(self.saved.items())

    def remove(self, key: str) -> None:
        self.data.pop(key, None)
        self.saved.pop(key, None)


class _Record(msgspec.Struct, frozen=True, array_like=True):
    """What the store keeps next to an assembly's bytes."""

    source: str
    manifest: ChunkManifest


_record_decoder = msgspec.msgpack.Decoder(_Record)


@dataclass
class _Assembly:
    key: str
    source: str
    manifest: ChunkManifest
    missing: set[int] = field(default_factory=set)
    hashes: frozenset[bytes] = frozenset()

    def __post_init__(self) -> None:
        self.hashes = frozenset(self.manifest.chunks)

    @property
    def held(self) -> int:
        return len(self.manifest.chunks) - len(self.missing)


@dataclass(frozen=True, slots=True)
class Progress:
    """One unfinished assembly: ``held`` of ``total`` chunks."""

    source: str
    kind: str
    size: int
    held: int
    total: int


@dataclass(frozen=True, slots=True)
class Completed:
    """Every chunk is in and the whole hash matched: take the bytes with :meth:`Assembler.take`."""

    source: str
    kind: str
    key: str
    size: int


ChunkOutcome = Completed | Progress | None  # None: a duplicate or an already finished transfer


def check_manifest(m: ChunkManifest, limits: ChunkLimits) -> None:
    """A manifest's own consistency and the receiver's bounds (the peer's fault if not)."""
    if m.size < 1 or m.chunk_size < 1:
        raise RemoteProtocolError("bad_manifest", f"size {m.size}, chunk size {m.chunk_size}")
    if m.size > limits.max_message_bytes:
        raise RemoteProtocolError("too_large", f"{m.size} bytes (max {limits.max_message_bytes})")
    if m.chunk_size > limits.max_chunk_bytes or len(m.chunks) > limits.max_chunks:
        raise RemoteProtocolError("too_large", f"{len(m.chunks)} chunks of {m.chunk_size} bytes")
    if len(m.chunks) != chunk_count(m.size, m.chunk_size):
        raise RemoteProtocolError(
            "bad_manifest", f"{len(m.chunks)} chunk hashes for {m.size} bytes in chunks of {m.chunk_size}"
        )
    if len(m.sha256) != HASH_BYTES or any(len(h) != HASH_BYTES for h in m.chunks):
        raise RemoteProtocolError("bad_manifest", "hashes must be SHA-256 (32 bytes)")


def _key(source: str, sha256: bytes) -> str:
    # A file name whatever the source's spelling: hex of a hash of both.
    return hashlib.sha256(source.encode() + b"\0" + sha256).hexdigest()[:40]


class Assembler:
    """Assembles chunked messages from verified manifests; see the module docstring."""

    def __init__(self, store: ChunkStore, limits: ChunkLimits = ChunkLimits()) -> None:
        self.store = store
        self.limits = limits
        self._by_source: dict[str, _Assembly] = {}
        self._wanted: dict[tuple[str, bytes], list[int]] = {}  # (source, chunk hash) -> indices
        self._done: OrderedDict[tuple[str, bytes], frozenset[bytes]] = OrderedDict()

    # ---- queries ---------------------------------------------------------------------------

    @property
    def reserved_bytes(self) -> int:
        """Bytes reserved in the store by unfinished assemblies (bounded by max_total_bytes)."""
        return sum(a.manifest.size for a in self._by_source.values())

    def pending(self) -> list[Progress]:
        return [self._progress(a) for a in self._by_source.values()]

    # ---- input -----------------------------------------------------------------------------

    def offer_manifest(self, source: str, manifest: ChunkManifest) -> Progress | None:
        """Open (or keep) the assembly a verified manifest describes.

        None: that exact transfer already finished here (a retained manifest re-delivered).
        Raises RemoteProtocolError (``bad_manifest``, ``too_large``, ``chunk_capacity``)."""
        check_manifest(manifest, self.limits)
        if (source, manifest.sha256) in self._done:
            return None
        current = self._by_source.get(source)
        if current is not None and current.manifest.sha256 == manifest.sha256:
            return self._progress(current)  # the same transfer again: resume, keep what is held
        others = [a for s, a in self._by_source.items() if s != source]
        if len(others) >= self.limits.max_assemblies or (
            sum(a.manifest.size for a in others) + manifest.size > self.limits.max_total_bytes
        ):
            raise RemoteProtocolError(
                "chunk_capacity", f"{len(others)} assemblies in progress; {manifest.size} more bytes do not fit"
            )
        if current is not None:
            self._drop(current)  # superseded by a newer message from the same source
        key = _key(source, manifest.sha256)
        self.store.create(key, manifest.size, msgspec.msgpack.encode(_Record(source, manifest)))
        assembly = _Assembly(key, source, manifest, set(range(len(manifest.chunks))))
        self._open(assembly)
        return self._progress(assembly)

    def offer_chunk(self, source: str, data: bytes) -> ChunkOutcome:
        """Store a chunk the source's manifest names. Completed when it was the last one."""
        digest = chunk_hash(data)
        indices = self._wanted.get((source, digest))
        if indices is None:
            current = self._by_source.get(source)
            if current is not None and digest in current.hashes:
                return None  # held already (QoS 1 or retained re-delivery)
            if any(digest in hashes for (s, _), hashes in self._done.items() if s == source):
                return None  # a finished transfer's chunk again (retained re-delivery)
            raise RemoteProtocolError("unknown_chunk", f"{len(data)} bytes whose hash no manifest from {source[:80]!r} names")
        assembly = self._by_source[source]
        m = assembly.manifest
        for index in indices:
            expected = min(m.chunk_size, m.size - index * m.chunk_size)
            if len(data) != expected:  # only possible with a broken manifest: same hash, other length
                raise RemoteProtocolError("bad_manifest", f"chunk {index} is {len(data)} bytes, not {expected}")
        fresh = [i for i in indices if i in assembly.missing]
        if not fresh:
            return None
        for index in fresh:
            self.store.write(assembly.key, index * m.chunk_size, data)
            assembly.missing.discard(index)
        del self._wanted[(source, digest)]
        if assembly.missing:
            return self._progress(assembly)
        return self._finish(assembly)

    def take(self, completed: Completed) -> bytes:
        """The assembled message's bytes (then released from the store)."""
        try:
            return self.store.read(completed.key, 0, completed.size)
        finally:
            self.store.remove(completed.key)

    def restore(self) -> list[Completed]:
        """Rebuild the assemblies the store holds (after a restart): each chunk whose bytes
        hash right is held. Returns any that turn out complete; drops unreadable records."""
        out = []
        for key, raw in self.store.records():
            try:
                record = _record_decoder.decode(raw)
                check_manifest(record.manifest, self.limits)
            except (msgspec.DecodeError, msgspec.ValidationError, RemoteProtocolError):
                self.store.remove(key)
                continue
            m = record.manifest
            if key != _key(record.source, m.sha256) or record.source in self._by_source:
                self.store.remove(key)
                continue
            missing = {
                i for i, h in enumerate(m.chunks)
                if chunk_hash(self.store.read(key, i * m.chunk_size, min(m.chunk_size, m.size - i * m.chunk_size))) != h
            }
            assembly = _Assembly(key, record.source, m, missing)
            self._open(assembly)
            if not missing:
                try:
                    out.append(self._finish(assembly))
                except RemoteProtocolError:
                    pass  # removed by _finish; the sender's next manifest starts again
        return out

    # ---- internals -------------------------------------------------------------------------

    def _open(self, assembly: _Assembly) -> None:
        self._by_source[assembly.source] = assembly
        for index in sorted(assembly.missing):
            self._wanted.setdefault((assembly.source, assembly.manifest.chunks[index]), []).append(index)

    def _drop(self, assembly: _Assembly) -> None:
        del self._by_source[assembly.source]
        for h in assembly.hashes:
            self._wanted.pop((assembly.source, h), None)
        self.store.remove(assembly.key)

    def _finish(self, assembly: _Assembly) -> Completed:
        m = assembly.manifest
        whole = hashlib.sha256()
        for offset in range(0, m.size, _READ_BLOCK):
            whole.update(self.store.read(assembly.key, offset, min(_READ_BLOCK, m.size - offset)))
        del self._by_source[assembly.source]
        if whole.digest() != m.sha256:
            self.store.remove(assembly.key)
            raise RemoteProtocolError("bad_message_hash", f"{m.size} bytes from {assembly.source[:80]!r}")
        self._done[(assembly.source, m.sha256)] = frozenset(m.chunks)
        while len(self._done) > _REMEMBER_DONE:
            self._done.popitem(last=False)
        return Completed(assembly.source, m.kind, assembly.key, m.size)

    @staticmethod
    def _progress(assembly: _Assembly) -> Progress:
        m = assembly.manifest
        return Progress(assembly.source, m.kind, m.size, assembly.held, len(m.chunks))
