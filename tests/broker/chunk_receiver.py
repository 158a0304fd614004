"""A gateway's model download, alone, as a process: ``python -m tests.broker.chunk_receiver ARGS``.

It does what the gateway runtime does with the model topics (``edge.chunked.ModelChunks``
for the chunks, ``EdgeSecurity.open_from_aggregator`` for the manifest and the assembled
model), with a persistent MQTT session and its spool in SPOOL, so a test can kill it with
SIGKILL and start it again. It prints ``held N/T`` as chunks arrive, and when the model is
complete writes OUT (JSON): the traced memory peak (tracemalloc, from the process start)
while chunks were taken in and once the whole message was read back for decoding, the
chunks it stored in this run, and the decoded model.

argv: URL CLIENT_ID FLEET TASK SPOOL AGGREGATOR_PUBLIC_KEY_HEX OUT [--clean-start]
"""

from __future__ import annotations

import hashlib
import json
import queue
import random
import sys
import time
import tracemalloc
from pathlib import Path

from edge.chunked import ModelChunks
from edge.security import EdgeSecurity
from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec, signing
from fedcore.protocol.chunks import ChunkLimits
from fedcore.protocol.messages import ChunkManifest, GlobalModel, Kind
from fedcore.protocol.tensors import decode_tensors
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.transport.base import Connected, MessageReceived, TransportEvent
from fedcore.transport.paho import PahoTransport

MAX_MESSAGE = 64 * 1024 * 1024


def _handle(event: MessageReceived, security: EdgeSecurity, chunks: ModelChunks) -> bytes | None:
    if parse_topic(event.topic).kind is TopicKind.MODEL_CHUNK:
        return chunks.on_chunk(event.payload, time.time())
    env = security.open_from_aggregator(event.payload, (Kind.MODEL, Kind.MANIFEST))
    if env.kind == Kind.MANIFEST:
        chunks.on_manifest(codec.decode_body(env, ChunkManifest), time.time())
    return None


def main(argv: list[str]) -> int:
    url, client_id, fleet, task, spool, key_hex, out = argv[:7]
    tracemalloc.start()
    topics = Topics(fleet, task)
    keyring = signing.Keyring({}, "aggregator", signing.VerifyKey(bytes.fromhex(key_hex)))
    security = EdgeSecurity(limits=codec.Limits(max_message_bytes=MAX_MESSAGE, max_elements=MAX_MESSAGE // 4),
                            keyring=keyring)
    chunks = ModelChunks(Path(spool), ChunkLimits(max_message_bytes=MAX_MESSAGE, max_assemblies=1))
    for p in chunks.assembler.pending():
        print(f"restored {p.held}/{p.total}", flush=True)
    events: queue.Queue[TransportEvent] = queue.Queue()
    transport = PahoTransport(url, client_id, clean_start="--clean-start" in argv, session_expiry=3600,
                              rng=random.Random(0), backoff_min=0.05, backoff_max=0.5)
    prefix = topics.model_chunks_filter()[:-1]

    def enqueue(event: TransportEvent) -> None:  # as the gateway runtime's _enqueue
        if isinstance(event, MessageReceived) and event.topic.startswith(prefix) and not chunks.admit(
                len(event.payload)):
            return
        events.put(event)

    transport.start(enqueue)
    stored = intake_peak = 0
    whole: bytes | None = None
    while whole is None:
        try:
            event = events.get(timeout=0.2)
        except queue.Empty:
            if chunks.stalled(time.time()):
                transport.subscribe(topics.model_chunks_filter())
            continue
        if isinstance(event, Connected):
            for topic in (topics.model(), topics.model_chunks_filter()):
                transport.subscribe(topic)
        elif isinstance(event, MessageReceived):
            intake_peak = tracemalloc.get_traced_memory()[1]  # before the last one is taken whole
            held = sum(p.held for p in chunks.assembler.pending())
            try:
                whole = _handle(event, security, chunks)
            except RemoteProtocolError as exc:  # counted and dropped, as the gateway does
                print(f"rejected {exc.reason}", flush=True)
            pending = chunks.assembler.pending()
            if whole is not None or (pending and pending[0].held > held):
                stored += 1
                if pending:
                    print(f"held {pending[0].held}/{pending[0].total}", flush=True)
    _, whole_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    transport.stop()
    env = security.open_from_aggregator(whole, Kind.MODEL)  # signature, sender, bounds
    model = codec.decode_body(env, GlobalModel)
    arrays = decode_tensors(model.tensors, MAX_MESSAGE // 4)
    digest = hashlib.sha256(b"".join(a.tobytes() for a in arrays)).hexdigest()
    Path(out).write_text(json.dumps({"intake_peak": intake_peak, "whole_peak": whole_peak, "stored": stored, "version": model.version,
                                     "size": len(whole), "tensors_sha256": digest}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
