"""The aggregator's side of chunked transfer (``fedcore.protocol.chunks``): I/O, called by the runtime.

Downlink: a model message over the broker's limit goes out as a signed manifest, retained
on the model topic, and its chunks, each retained on ``model/chunk/{sha256}``. Retained,
so that a gateway that connects (or reconnects, or restarts) at any time gets the manifest
and every chunk from the broker alone, and one that lost chunks asks again by subscribing
again. Once a new set is out, the chunks of the previous set that it does not share are
deleted from the broker (an empty retained message); which chunk topics are retained is
kept in ``state_dir/model-chunks.json`` so a restarted aggregator deletes them too.

Uplink: a gateway's manifest (on its update topic, verified there) opens an assembly in
``state_dir/chunks``; its chunks (on ``update/{device}/chunk``) fill it; the assembled
message then goes through the same checks as one that arrived whole. The spool survives a
restart: chunks the persistent session delivers after it complete the assembly.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

from fedcore.protocol import chunks
from fedcore.protocol.chunks import Assembler, ChunkLimits, Completed
from fedcore.protocol.messages import ChunkManifest
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Transport
from fedcore.transport.chunk_spool import FileChunkStore

log = logging.getLogger("fedgate.aggregator")
PUBLISHED_FILE = "model-chunks.json"
_ANY_CHUNK = b"\0" * 32  # chunk topics all have the same length: any hash gives the limit


class ChunkedLink:
    def __init__(self, transport: Transport, topics: Topics, state_dir: Path, limits: ChunkLimits) -> None:
        self.transport = transport
        self.topics = topics
        self._published_path = state_dir / PUBLISHED_FILE
        self.assembler = Assembler(FileChunkStore(state_dir / "chunks"), limits)
        # complete before a crash, not yet handled: the runtime takes them once it runs
        self.restored: list[Completed] = self.assembler.restore()
        self.published = self._load_published()

    # ---- downlink --------------------------------------------------------------------------

    def publish_model(self, payload: bytes, seal: Callable[[ChunkManifest], bytes]) -> int:
        """Publish a signed model message (retained), chunked when over the limit; wire bytes."""
        topic = self.topics.model()
        limit = min(self.transport.payload_limit(topic), self.transport.payload_limit(
            self.topics.model_chunk(_ANY_CHUNK)))
        pubs = chunks.publications(payload, "model", topic, limit, self.topics.model_chunk, seal, retain=True)
        for pub in pubs:
            self.transport.publish(pub.topic, pub.payload, qos=1, retain=True)
        current = [pub.topic for pub in pubs[1:]]
        stale = set(self.published) - set(current)
        for old in sorted(stale):
            self.transport.publish(old, b"", qos=1, retain=True)  # deletes the retained chunk
        if stale or current != self.published:
            self._save_published(current)
        if len(pubs) > 1:
            log.info("model of %d bytes published as %d chunks of at most %d bytes", len(payload),
                     len(pubs) - 1, limit)
        return sum(len(p.payload) + len(p.topic) for p in pubs)

    def _load_published(self) -> list[str]:
        try:
            topics = json.loads(self._published_path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("cannot read %s (%s): stale model chunks may stay retained", self._published_path, exc)
            return []
        prefix = self.topics.model_chunk(_ANY_CHUNK).rsplit("/", 1)[0] + "/"
        return [t for t in topics if isinstance(t, str) and t.startswith(prefix)] if isinstance(topics, list) else []

    def _save_published(self, current: list[str]) -> None:
        self.published = current
        tmp = self._published_path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(current))
            os.replace(tmp, self._published_path)
        except OSError as exc:  # only the clean-up after a restart needs it
            log.warning("cannot write %s: %s", self._published_path, exc.strerror or exc)

    # ---- uplink ----------------------------------------------------------------------------

    def on_manifest(self, device: str, manifest: ChunkManifest) -> None:
        """A verified manifest from ``device``. Raises RemoteProtocolError when refused."""
        progress = self.assembler.offer_manifest(device, manifest)
        if progress is not None:
            log.info("%s sends its %s of %d bytes as %d chunks (%d held)", device, manifest.kind,
                     manifest.size, progress.total, progress.held)

    def take_restored(self) -> list[tuple[str, bytes]]:
        out = [(done.source, self.assembler.take(done)) for done in self.restored]
        self.restored = []
        return out

    def on_chunk(self, device: str, payload: bytes) -> bytes | None:
        """A chunk from ``device``'s chunk topic: the whole message once it is complete."""
        outcome = self.assembler.offer_chunk(device, payload)
        if isinstance(outcome, Completed):
            return self.assembler.take(outcome)
        return None
