"""The gateway runtime with chunked messages, on an in-memory broker whose packets are
limited to 16 KB: a chunked model is assembled and installed, the update goes out in
chunks, and a refused chunk topic is a permanent ACL problem (exit 77)."""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import numpy as np

from edge.config import DataConfig, EdgeConfig
from edge.data import DatasetSource
from edge.runtime import EdgeService
from edge.security import EdgeSecurity
from fedcore.datasets import default_train_config, load_dataset
from fedcore.learning.models import init_params
from fedcore.protocol import chunks, codec
from fedcore.protocol.chunks import Assembler
from fedcore.protocol.messages import (
    ChunkManifest,
    GlobalModel,
    Kind,
    ModelSpec,
    ModelUpdate,
    RoundAnnouncement,
)
from fedcore.protocol.tensors import encode_tensors
from fedcore.protocol.topics import Topics
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import MessageReceived, PublishDenied
from fedcore.transport.chunk_spool import FileChunkStore
from fedcore.transport.memory import MemoryBroker, MemoryTransport

LIMIT = 16 * 1024
TOPICS = Topics("f", "t")


def service(tmp_path: Path, broker: MemoryBroker) -> tuple[EdgeService, ModelSpec, DatasetSource]:
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=200)
    unit = next(iter(dataset.units.values()))
    data = DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test, 1.0, dataset.task)
    spec = ModelSpec("mlp", (unit.x_train.shape[1], 256, 64, int(unit.y_train.max()) + 1), task=dataset.task)
    config = EdgeConfig(file="edge.toml", device="gw1", fleet="f", task="t",
                        broker=BrokerConfig("mqtt://memory", "gw1"), data=DataConfig(unit=next(iter(dataset.units))),
                        state_dir=tmp_path)
    return EdgeService(config, MemoryTransport(broker, "gw1"), data, EdgeSecurity()), spec, data


def test_a_chunked_model_is_installed_and_the_update_goes_out_in_chunks(tmp_path: Path) -> None:
    broker = MemoryBroker(max_packet_size=LIMIT)
    edge, spec, _ = service(tmp_path, broker)
    seen: queue.Queue[MessageReceived] = queue.Queue()
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: seen.put(e) if isinstance(e, MessageReceived) else None)
    for topic in (TOPICS.updates_filter(), TOPICS.update_chunks_filter()):
        aggregator.subscribe(topic)
    weights = init_params(spec, np.random.default_rng(0))
    env = codec.make_envelope(Kind.MODEL, "f", "t", 0, "aggregator", GlobalModel(0, 0, b"", spec,
                                                                                 encode_tensors(weights)), 0.0)
    payload = codec.encode(env)

    def seal(manifest: ChunkManifest) -> bytes:
        return codec.encode(codec.make_envelope(Kind.MANIFEST, "f", "t", 0, "aggregator", manifest, 0.0))

    limit = aggregator.payload_limit(TOPICS.model_chunk(b"\0" * 32))
    pubs = chunks.publications(payload, "model", TOPICS.model(), limit, TOPICS.model_chunk, seal, retain=True)
    assert len(pubs) > 3
    # Retained, chunks first and one of them twice: the gateway subscribes after all of it
    # is on the broker, and gets the manifest, then the chunks, as a late joiner does.
    for pub in [*pubs[1:], pubs[1], pubs[0]]:
        aggregator.publish(pub.topic, pub.payload, retain=True)
    announcement = RoundAnnouncement(round=1, model_version=0, deadline=1e12,
                                     train=default_train_config(load_dataset("synthetic", gateways=1,
                                                                             max_rows_per_unit=200)))
    aggregator.publish(TOPICS.round(), codec.encode(codec.make_envelope(Kind.ROUND, "f", "t", 1, "aggregator",
                                                                         announcement, 0.0)), retain=True)
    thread = threading.Thread(target=edge.run, daemon=True)
    thread.start()
    got: list[MessageReceived] = []
    try:
        while True:
            msg = seen.get(timeout=60)
            got.append(msg)
            if msg.topic == TOPICS.update("gw1"):
                break
        manifest = codec.decode_body(codec.decode(got[-1].payload), ChunkManifest)
        parts = [seen.get(timeout=10).payload for _ in manifest.chunks]
    finally:
        edge.stop()
        thread.join(timeout=10)
    assert edge.machine.version == 0 and not edge.rejected  # installed: it trained on version 0
    assert manifest.kind == "update" and all(len(p) <= LIMIT for p in parts)
    update = codec.decode_body(codec.decode(b"".join(parts)), ModelUpdate)
    assert (update.round, update.base_version) == (1, 0)
    assert list((tmp_path / "chunks").iterdir()) == []


def test_a_refused_chunk_topic_is_a_permanent_acl_problem(tmp_path: Path) -> None:
    edge, _, _ = service(tmp_path, MemoryBroker())
    watch = edge._connection_watch()
    verdict = watch.handle(PublishDenied(TOPICS.update_chunk("gw1"), 135), 0.0)
    assert verdict is not None and verdict.exit_code == 77


def test_a_model_assembled_before_a_restart_is_installed_from_the_spool(tmp_path: Path) -> None:
    """Every chunk was on disk when the gateway died: the restarted gateway installs the
    model from its spool, though the broker no longer has it, and trains on it."""
    broker = MemoryBroker(max_packet_size=LIMIT)
    edge, spec, _ = service(tmp_path, broker)
    edge.stop()  # never run: only its spool folder and the spec are used
    weights = init_params(spec, np.random.default_rng(1))
    payload = codec.encode(codec.make_envelope(Kind.MODEL, "f", "t", 0, "aggregator",
                                               GlobalModel(0, 0, b"", spec, encode_tensors(weights)), 0.0))
    manifest, parts = chunks.split(payload, 10_000, "model")
    spool = FileChunkStore(tmp_path / "chunks")
    Assembler(spool).offer_manifest("model", manifest)
    (key,) = [k for k, _ in spool.records()]
    for i, part in enumerate(parts):  # written, then the process died before taking it
        spool.write(key, i * manifest.chunk_size, part)
    seen: queue.Queue[MessageReceived] = queue.Queue()
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: seen.put(e) if isinstance(e, MessageReceived) else None)
    aggregator.subscribe(TOPICS.update_chunks_filter())
    train = default_train_config(load_dataset("synthetic", gateways=1, max_rows_per_unit=200))
    aggregator.publish(TOPICS.round(), codec.encode(codec.make_envelope(
        Kind.ROUND, "f", "t", 1, "aggregator", RoundAnnouncement(1, 0, 1e12, train), 0.0)), retain=True)
    restarted, _, _ = service(tmp_path, broker)
    thread = threading.Thread(target=restarted.run, daemon=True)
    thread.start()
    try:
        seen.get(timeout=60)  # a chunk of its update: it installed version 0 and trained
    finally:
        restarted.stop()
        thread.join(timeout=10)
    assert restarted.machine.version == 0 and not restarted.rejected
    assert list((tmp_path / "chunks").iterdir()) == []


def test_a_model_larger_than_max_message_says_so_in_the_status(tmp_path: Path) -> None:
    """Not a silent stall: the gateway is 'incompatible' with the reason, so the aggregator's
    rounds stop waiting for it and an operator sees what to change."""
    broker = MemoryBroker(max_packet_size=LIMIT)
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=200)
    name, unit = next(iter(dataset.units.items()))
    data = DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test, 1.0, dataset.task)
    config = EdgeConfig(file="edge.toml", device="gw1", fleet="f", task="t",
                        broker=BrokerConfig("mqtt://memory", "gw1", max_message=64 * 1024),
                        data=DataConfig(unit=name), state_dir=tmp_path)
    security = EdgeSecurity(limits=codec.Limits(max_message_bytes=config.broker.max_message))  # as edge.main
    edge = EdgeService(config, MemoryTransport(broker, "gw1"), data, security)
    aggregator = MemoryTransport(broker, "aggregator")
    aggregator.start(lambda e: None)

    def seal(manifest: ChunkManifest) -> bytes:
        return codec.encode(codec.make_envelope(Kind.MANIFEST, "f", "t", 0, "aggregator", manifest, 0.0))

    big = bytes(200 * 1024)  # a 200 KB model message against a 64 KB max_message
    limit = aggregator.payload_limit(TOPICS.model_chunk(b"\0" * 32))
    manifest = chunks.publications(big, "model", TOPICS.model(), limit, TOPICS.model_chunk, seal, retain=True)[0]
    aggregator.publish(manifest.topic, manifest.payload, retain=True)
    thread = threading.Thread(target=edge.run, daemon=True)
    thread.start()
    try:
        for _ in range(100):
            if edge.activity == "incompatible":
                break
            threading.Event().wait(0.1)
    finally:
        edge.stop()
        thread.join(timeout=10)
    assert edge.activity == "incompatible" and "broker.max_message" in edge.activity_detail
    assert edge.rejected["too_large"] == 1
