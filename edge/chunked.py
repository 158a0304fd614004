"""The gateway's side of chunked transfer (``fedcore.protocol.chunks``), used by the runtime.

Uplink: :func:`to_aggregator` turns one signed message for the aggregator into what to
publish: the message itself on the gateway's update topic when it fits, else a signed
manifest there and the chunks on ``update/{device}/chunk``.

Downlink: :class:`ModelChunks` assembles a model that the aggregator published as a
retained manifest and retained chunks, in ``state_dir/chunks`` (so a restart keeps what
was received). MQTT has no request: when an assembly makes no progress for
``STALL_S`` the runtime subscribes to the chunk topics again, and the broker sends every
retained chunk once more; those already held are skipped. Chunks waiting in the runtime's
queue are bounded too (:meth:`ModelChunks.admit`), so memory holds a few chunks, never
the model, until the assembled message is read back for decoding.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import chunks
from fedcore.protocol.chunks import Assembler, ChunkLimits, Completed
from fedcore.protocol.messages import ChunkManifest, Kind
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Transport
from fedcore.transport.chunk_spool import FileChunkStore

log = logging.getLogger("fedgate.edge")
STALL_S = 10.0  # no chunk for this long while a model is incomplete: ask the broker again
MAX_QUEUED_BYTES = 4 * 1024 * 1024  # chunks waiting in the runtime's queue (see admit)
SOURCE = "model"  # the one downlink stream that is chunked


def to_aggregator(
    payload: bytes, kind: Kind, topics: Topics, device: str, transport: Transport,
    seal: Callable[[ChunkManifest], bytes],
) -> list[chunks.Publication]:
    """What to publish (in order, QoS 1) for one signed message to the aggregator."""
    topic, chunk_topic = topics.update(device), topics.update_chunk(device)
    limit = min(transport.payload_limit(topic), transport.payload_limit(chunk_topic))
    return chunks.publications(payload, kind.value, topic, limit, lambda _hash: chunk_topic, seal)


class ModelChunks:
    def __init__(self, folder: Path, limits: ChunkLimits, max_queued: int = MAX_QUEUED_BYTES) -> None:
        self.assembler = Assembler(FileChunkStore(folder), limits)
        self.max_queued = max_queued
        self._lock = threading.Lock()  # admit() runs on the transport's thread
        self._queued = 0
        self._dropped = False
        # complete before a restart: installed once connected (the retained copies are
        # then recognised as this finished transfer and skipped)
        self.restored: list[Completed] = self.assembler.restore()
        self.progress_at = 0.0

    def admit(self, payload_size: int) -> bool:
        """For each chunk message, on the transport's thread, before it is queued: False (drop
        it) when ``max_queued`` bytes of chunks already wait for the loop. The broker sends
        retained chunks as fast as the network goes, faster than they are written; a dropped
        chunk stays retained and is asked for again as soon as the queue has drained."""
        with self._lock:
            if self._queued and self._queued + payload_size > self.max_queued:
                self._dropped = True
                return False
            self._queued += payload_size
            return True

    def on_manifest(self, manifest: ChunkManifest, now: float) -> None:
        if manifest.kind != Kind.MODEL:
            raise RemoteProtocolError("bad_kind", f"a chunked {manifest.kind[:20]!r} on the model topic")
        progress = self.assembler.offer_manifest(SOURCE, manifest)
        if progress is not None:
            self.progress_at = now
            log.info("model of %d bytes coming in %d chunks (%d held)", manifest.size, progress.total,
                     progress.held)

    def on_chunk(self, payload: bytes, now: float) -> bytes | None:
        """A retained chunk: the whole model message once complete. An empty payload is the
        aggregator deleting an old chunk, not a chunk."""
        with self._lock:
            self._queued = max(0, self._queued - len(payload))
        if not payload:
            return None
        outcome = self.assembler.offer_chunk(SOURCE, payload)
        if outcome is not None:
            self.progress_at = now
        if isinstance(outcome, Completed):
            return self.assembler.take(outcome)
        return None

    def take_restored(self) -> list[bytes]:
        out = [self.assembler.take(done) for done in self.restored]
        self.restored = []
        return out

    def stalled(self, now: float) -> bool:
        """Time to ask the broker for the chunks again: an assembly is open and chunks were
        dropped and the queue has drained, or nothing arrived for it for STALL_S."""
        with self._lock:
            drained = self._dropped and not self._queued
        if not self.assembler.pending() or (not drained and now - self.progress_at < STALL_S):
            return False
        with self._lock:
            self._dropped = False
        self.progress_at = now
        return True
