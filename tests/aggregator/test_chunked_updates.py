"""The aggregator runtime takes a gateway's chunked update: assembled from its update
chunk topic, resumed from the spool after a restart, then handled like an update that
arrived whole; foreign chunks and nested manifests are refused with their reason."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edge.participant import encode_raw
from fedcore.protocol import chunks, codec
from fedcore.protocol.messages import ChunkManifest, Kind, ModelUpdate, PipelineConfig
from fedcore.protocol.topics import Topics
from fedcore.transport.base import MessageReceived
from tests.aggregator.test_model_files import Aggregator

TOPICS = Topics("f", "t")


def chunked_update(agg: Aggregator, chunk_size: int) -> list[chunks.Publication]:
    m = agg.machine
    rng = np.random.default_rng(1)  # distinct chunks (a constant delta repeats its chunks)
    delta, _ = encode_raw([rng.normal(0, 0.01, w.shape).astype(np.float32) for w in m.weights], PipelineConfig())
    update = ModelUpdate(round=m.round, base_version=m.version, num_samples=100, delta=delta, train_loss=0.1)
    payload = codec.encode(codec.make_envelope(Kind.UPDATE, "f", "t", m.round, "gw1", update, agg.now,
                                               message_id="u1"))

    def seal(manifest: ChunkManifest) -> bytes:
        return codec.encode(codec.make_envelope(Kind.MANIFEST, "f", "t", m.round, "gw1", manifest, agg.now))

    return chunks.publications(payload, "update", TOPICS.update("gw1"), chunk_size,
                               lambda _hash: TOPICS.update_chunk("gw1"), seal)


def deliver(agg: Aggregator, pubs: list[chunks.Publication]) -> None:
    for pub in pubs:
        agg.service._on_message(MessageReceived(pub.topic, pub.payload, False), agg.now)


def test_a_chunked_update_is_assembled_across_an_aggregator_restart(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    version = agg.machine.version
    pubs = chunked_update(agg, 1000)
    assert len(pubs) > 4
    deliver(agg, pubs[:3])  # the manifest and two chunks, then the aggregator stops
    assert agg.machine.version == version and not agg.service.rejected
    again = Aggregator(tmp_path)  # from the checkpoint and the chunk spool
    (progress,) = again.service.chunked.assembler.pending()
    assert (progress.source, progress.held) == ("gw1", 2)
    again.start()
    deliver(again, [pubs[1], *pubs[3:]])  # a duplicate, then the rest
    assert again.machine.version == version + 1  # the update was taken and the round committed
    assert not again.service.rejected
    assert list((again.config.state_dir / "chunks").iterdir()) == []


def test_foreign_chunks_and_nested_manifests_are_refused(tmp_path: Path) -> None:
    agg = Aggregator(tmp_path)
    agg.start()
    pubs = chunked_update(agg, 1000)
    deliver(agg, pubs[:1])
    # gw2's chunk topic cannot fill gw1's message
    agg.service._on_message(MessageReceived(TOPICS.update_chunk("gw2"), pubs[1].payload, False), agg.now)
    assert agg.service.rejected == {"unknown_chunk": 1}
    # a manifest whose chunks make up another manifest is refused once assembled
    inner = pubs[0].payload
    manifest, parts = chunks.split(inner, 100, "update")
    outer = codec.encode(codec.make_envelope(Kind.MANIFEST, "f", "t", agg.machine.round, "gw1", manifest, agg.now))
    deliver(agg, [chunks.Publication(TOPICS.update("gw1"), outer, False)])
    deliver(agg, [chunks.Publication(TOPICS.update_chunk("gw1"), p, False) for p in parts])
    assert agg.service.rejected["bad_kind"] == 1
