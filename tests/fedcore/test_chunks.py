"""Chunked transfer, pure: splitting, publications, the assembler's rules and bounds."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import msgspec
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.protocol import chunks
from fedcore.protocol.chunks import Assembler, ChunkLimits, Completed, MemoryChunkStore, Progress
from fedcore.protocol.messages import ChunkManifest
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.transport.chunk_spool import FileChunkStore

TOPICS = Topics("plant", "wind")


def seal(m: ChunkManifest) -> bytes:
    return msgspec.msgpack.encode(m)  # the services sign it in an envelope; here the bytes suffice


def assemble(asm: Assembler, source: str, manifest: ChunkManifest, pieces: list[bytes]) -> bytes | None:
    asm.offer_manifest(source, manifest)
    done = None
    for piece in pieces:
        outcome = asm.offer_chunk(source, piece)
        if isinstance(outcome, Completed):
            done = asm.take(outcome)
    return done


def test_a_message_within_the_limit_goes_out_unchanged() -> None:
    pubs = chunks.publications(b"x" * 100, "model", TOPICS.model(), 100, TOPICS.model_chunk, seal, retain=True)
    assert pubs == [chunks.Publication(TOPICS.model(), b"x" * 100, True)]


def test_a_larger_message_is_a_manifest_then_its_chunks() -> None:
    message = bytes(range(256)) * 10  # 2560 bytes
    pubs = chunks.publications(message, "model", TOPICS.model(), 1000, TOPICS.model_chunk, seal, retain=True)
    manifest = msgspec.msgpack.decode(pubs[0].payload, type=ChunkManifest)
    assert pubs[0].topic == TOPICS.model()
    assert (manifest.kind, manifest.size, manifest.chunk_size) == ("model", 2560, 1000)
    assert manifest.sha256 == hashlib.sha256(message).digest()
    assert [p.payload for p in pubs[1:]] == [message[:1000], message[1000:2000], message[2000:]]
    for pub, h in zip(pubs[1:], manifest.chunks, strict=True):
        assert pub.topic == TOPICS.model_chunk(h) and hashlib.sha256(pub.payload).digest() == h
        assert parse_topic(pub.topic).kind is TopicKind.MODEL_CHUNK
        assert pub.retain and len(pub.payload) <= 1000


def test_chunk_topics_parse_and_stay_in_the_device_subtree() -> None:
    parsed = parse_topic(TOPICS.update_chunk("gw1"))
    assert (parsed.kind, parsed.device, parsed.task) == (TopicKind.UPDATE_CHUNK, "gw1", "wind")
    with pytest.raises(RemoteProtocolError):
        parse_topic(f"{TOPICS.model()}/chunk/not-a-hash")
    with pytest.raises(LocalProtocolError):
        TOPICS.model_chunk(b"short")


@settings(max_examples=60, deadline=None)
@given(
    message=st.binary(min_size=1, max_size=3000),
    chunk_size=st.integers(1, 700),
    seed=st.integers(0, 2**32),
    duplicates=st.integers(0, 5),
)
def test_any_order_and_duplicates_give_back_the_message(message: bytes, chunk_size: int, seed: int,
                                                         duplicates: int) -> None:
    manifest, pieces = chunks.split(message, chunk_size, "update")
    rng = random.Random(seed)
    pieces = pieces + [rng.choice(pieces) for _ in range(duplicates)]
    rng.shuffle(pieces)
    asm = Assembler(MemoryChunkStore())
    assert assemble(asm, "gw1", manifest, pieces) == message
    assert asm.pending() == [] and asm.store.records() == []  # type: ignore[attr-defined]


@settings(max_examples=40, deadline=None)
@given(message=st.binary(min_size=2, max_size=2000), chunk_size=st.integers(1, 300), data=st.data())
def test_a_corrupted_chunk_is_refused_and_the_good_one_still_completes(message: bytes, chunk_size: int,
                                                                     data: st.DataObject) -> None:
    manifest, pieces = chunks.split(message, chunk_size, "update")
    index = data.draw(st.integers(0, len(pieces) - 1))
    at = data.draw(st.integers(0, len(pieces[index]) - 1))
    bad = bytearray(pieces[index])
    bad[at] ^= 0x01
    assume(bytes(bad) not in pieces)  # a flip that makes another real chunk is that chunk
    asm = Assembler(MemoryChunkStore())
    asm.offer_manifest("gw1", manifest)
    with pytest.raises(RemoteProtocolError) as exc:
        asm.offer_chunk("gw1", bytes(bad))
    assert exc.value.reason == "unknown_chunk"
    assert assemble(asm, "gw1", manifest, pieces) == message


def test_chunks_from_another_source_do_not_fill_an_assembly() -> None:
    manifest, pieces = chunks.split(b"a" * 50 + b"b" * 50, 50, "update")
    asm = Assembler(MemoryChunkStore())
    asm.offer_manifest("gw1", manifest)
    with pytest.raises(RemoteProtocolError) as exc:
        asm.offer_chunk("gw2", pieces[0])  # gw2 cannot push bytes into gw1's message
    assert exc.value.reason == "unknown_chunk"
    assert asm.pending() == [Progress("gw1", "update", 100, 0, 2)]


@pytest.mark.parametrize(
    ("manifest", "reason"),
    [
        (ChunkManifest("m", 0, 10, (), b"\0" * 32), "bad_manifest"),
        (ChunkManifest("m", 100, 10, (b"\0" * 32,) * 9, b"\0" * 32), "bad_manifest"),
        (ChunkManifest("m", 20, 10, (b"\0" * 31, b"\0" * 32), b"\0" * 32), "bad_manifest"),
        (ChunkManifest("m", 1001, 1001, (b"\0" * 32,), b"\0" * 32), "too_large"),
        (ChunkManifest("m", 1000, 1, (b"\0" * 32,) * 1000, b"\0" * 32), "too_large"),
    ],
)
def test_bad_or_oversized_manifests_are_refused_with_a_reason(manifest: ChunkManifest, reason: str) -> None:
    asm = Assembler(MemoryChunkStore(), ChunkLimits(max_message_bytes=1000, max_chunks=100))
    with pytest.raises(RemoteProtocolError) as exc:
        asm.offer_manifest("gw1", manifest)
    assert exc.value.reason == reason
    assert asm.reserved_bytes == 0


def test_assemblies_are_bounded_in_number_and_bytes() -> None:
    limits = ChunkLimits(max_assemblies=2, max_total_bytes=250)
    asm = Assembler(MemoryChunkStore(), limits)
    asm.offer_manifest("gw1", chunks.split(b"1" * 100, 10, "update")[0])
    asm.offer_manifest("gw2", chunks.split(b"2" * 100, 10, "update")[0])
    for source, size in (("gw3", 10), ("gw1", 200)):  # a third one; gw1 replaced by one too big
        with pytest.raises(RemoteProtocolError) as exc:
            asm.offer_manifest(source, chunks.split(b"3" * size, 10, "update")[0])
        assert exc.value.reason == "chunk_capacity"
    asm.offer_manifest("gw1", chunks.split(b"4" * 150, 10, "update")[0])  # replaces gw1's within bounds
    assert asm.reserved_bytes == 250 and len(asm.pending()) == 2


def test_a_newer_manifest_replaces_the_unfinished_one_and_the_same_one_resumes() -> None:
    old, old_pieces = chunks.split(bytes(range(120)), 40, "model")
    new, new_pieces = chunks.split(bytes(range(100, 220)), 40, "model")
    store = MemoryChunkStore()
    asm = Assembler(store)
    asm.offer_manifest("agg", old)
    asm.offer_chunk("agg", old_pieces[0])
    assert asm.offer_manifest("agg", old) == Progress("agg", "model", 120, 1, 3)  # resumed
    asm.offer_manifest("agg", new)
    assert len(store.data) == 1  # the old assembly's bytes are gone
    with pytest.raises(RemoteProtocolError):
        asm.offer_chunk("agg", old_pieces[1])
    assert assemble(asm, "agg", new, new_pieces) == bytes(range(100, 220))
    # Re-delivered (retained) manifest and chunks of a finished transfer are quiet no-ops.
    assert asm.offer_manifest("agg", new) is None and asm.offer_chunk("agg", new_pieces[0]) is None


def test_a_manifest_whose_chunks_do_not_make_its_message_is_refused() -> None:
    manifest, pieces = chunks.split(b"abcdef", 3, "update")
    lying = msgspec.structs.replace(manifest, sha256=b"\1" * 32)
    asm = Assembler(MemoryChunkStore())
    asm.offer_manifest("gw1", lying)
    asm.offer_chunk("gw1", pieces[0])
    with pytest.raises(RemoteProtocolError) as exc:
        asm.offer_chunk("gw1", pieces[1])
    assert exc.value.reason == "bad_message_hash"
    assert asm.pending() == [] and asm.store.records() == []  # type: ignore[attr-defined]


def test_a_restart_keeps_what_the_spool_holds(tmp_path: Path) -> None:
    message = random.Random(3).randbytes(10_000)
    manifest, pieces = chunks.split(message, 1000, "model")
    first = Assembler(FileChunkStore(tmp_path / "spool"))
    first.offer_manifest("agg", manifest)
    for piece in pieces[::2]:
        first.offer_chunk("agg", piece)
    # The process dies; a new one finds the spool and holds the same half.
    second = Assembler(FileChunkStore(tmp_path / "spool"))
    assert second.restore() == []
    assert second.pending() == [Progress("agg", "model", 10_000, 5, 10)]
    assert second.offer_manifest("agg", manifest) == Progress("agg", "model", 10_000, 5, 10)
    assert assemble(second, "agg", manifest, pieces[1::2]) == message
    assert list((tmp_path / "spool").iterdir()) == []


def test_a_damaged_spool_entry_is_dropped_or_reloaded(tmp_path: Path) -> None:
    manifest, pieces = chunks.split(random.Random(4).randbytes(300), 100, "model")
    store = FileChunkStore(tmp_path)
    asm = Assembler(store)
    asm.offer_manifest("agg", manifest)
    asm.offer_chunk("agg", pieces[0])
    (key,) = [k for k, _ in store.records()]
    # A chunk region overwritten on disk no longer counts as held.
    store.write(key, 0, b"y" * 100)
    (tmp_path / "junk.manifest").write_bytes(b"\xc1")  # not a record, not a key
    (tmp_path / "0123.part").write_bytes(b"orphan")  # a part without its manifest
    restarted = Assembler(FileChunkStore(tmp_path))
    assert restarted.restore() == []
    assert restarted.pending() == [Progress("agg", "model", 300, 0, 3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{key}.manifest", f"{key}.part"]
