"""The training path's store reader against real sample files, written as the bridge writes
them (fedcore.samples.SampleWriter, one timestamp per request) and handed back to read-only
readers with fedcore.samples.close_writer when the writer stops."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest

from edge.rows import RawRows
from edge.store import StoreNotReady, StoreReader
from fedcore import samples
from fedcore.samples import Sample, SampleWriter

SIGNALS = ("a", "b", "c")


def polls(first: int, count: int, device: str = "dev", t0: float = 1000.0) -> list[Sample]:
    """``count`` requests of the three signals, one second apart, interleaved with another
    device's readings; values encode the poll number (a = i, b = 10 i, c = 100 i)."""
    out = []
    for i in range(first, first + count):
        ts = t0 + i
        out += [Sample(device, name, ts, float(i) * 10**k) for k, name in enumerate(SIGNALS)]
        out.append(Sample("other", "z", ts + 0.5, 1.0))
    return out


def write(path: Path, batches: Iterable[list[Sample]]) -> None:
    """One bridge run: a writer, its batches, and the hand-back when it stops."""
    writer = SampleWriter(path)
    for batch in batches:
        writer.write(batch)
    samples.close_writer(writer.conn)


def read(reader: StoreReader) -> tuple[list[RawRows], RawRows]:
    """The chunks of one read_new call, and all of them joined."""
    chunks = list(reader.read_new())
    time = np.concatenate([c.time for c in chunks]) if chunks else np.zeros(0)
    values = np.concatenate([c.values for c in chunks]) if chunks else np.zeros((0, len(reader.signals)))
    return chunks, RawRows(time, values)


def polls_of(rows: RawRows, t0: float = 1000.0) -> list[int]:
    return [int(t - t0) for t in rows.time]


def test_a_second_read_returns_only_what_was_appended_since(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    write(store, [polls(0, 50)])
    reader = StoreReader(store, "dev", SIGNALS)
    _, first = read(reader)
    assert polls_of(first) == list(range(50))
    np.testing.assert_array_equal(first.values[7], [7.0, 70.0, 700.0])
    assert read(reader)[1].time.size == 0  # nothing new
    write(store, [polls(50, 5), polls(55, 5)])  # the bridge runs again
    _, second = read(reader)
    assert polls_of(second) == list(range(50, 60))
    assert reader.samples_read == 60 * len(SIGNALS)


def test_reads_while_the_bridge_writes(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    writer = SampleWriter(store)
    writer.write(polls(0, 10))
    reader = StoreReader(store, "dev", SIGNALS)
    assert polls_of(read(reader)[1]) == list(range(10))
    writer.write(polls(10, 3))
    assert polls_of(read(reader)[1]) == [10, 11, 12]
    samples.close_writer(writer.conn)
    writer = SampleWriter(store)
    writer.write(polls(13, 1))
    samples.close_writer(writer.conn)
    assert polls_of(read(reader)[1]) == [13]


@pytest.mark.parametrize("chunk", [4, 5, 7, 11, 64])
def test_a_chunk_never_splits_the_samples_of_one_timestamp(tmp_path: Path, chunk: int) -> None:
    store = tmp_path / "samples.db"
    missing_b = [s for s in polls(40, 1) if s.signal != "b"]  # a request that lost a value
    write(store, [polls(0, 40), missing_b, polls(41, 19)])
    reader = StoreReader(store, "dev", SIGNALS, chunk=chunk)
    chunks, rows = read(reader)
    assert len(chunks) > 1
    assert polls_of(rows) == list(range(60))  # each timestamp once, none lost
    for c in chunks:
        assert np.isfinite(c.values).sum() <= chunk
    complete = np.isfinite(rows.values).all(axis=1)
    assert polls_of(RawRows(rows.time[~complete], rows.values[~complete])) == [40]
    np.testing.assert_array_equal(rows.values[complete][:, 1], 10.0 * rows.values[complete][:, 0])


def test_since_s_starts_near_the_newest_samples(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    write(store, [polls(0, 1000)])
    reader = StoreReader(store, "dev", SIGNALS, since_s=100.0, chunk=64)
    _, rows = read(reader)
    assert polls_of(rows) == list(range(899, 1000))  # newest 1999 s, 100 s before it
    write(store, [polls(1000, 2)])
    assert polls_of(read(reader)[1]) == [1000, 1001]  # then incremental as usual


def test_a_missing_store_is_not_ready_and_names_the_file(tmp_path: Path) -> None:
    store = tmp_path / "bridge" / "samples.db"
    reader = StoreReader(store, "dev", SIGNALS)
    with pytest.raises(StoreNotReady, match=str(store)):
        read(reader)
    assert not store.parent.exists()  # nothing created
    write(store, [polls(0, 3)])
    assert polls_of(read(reader)[1]) == [0, 1, 2]


def test_missing_signals_are_not_ready_and_named(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    write(store, [[s for s in polls(0, 5) if s.signal != "b"]])
    reader = StoreReader(store, "dev", ("a", "b", "c", "d"))
    with pytest.raises(StoreNotReady) as err:
        read(reader)
    message = str(err.value)
    assert "b, d" in message and "'dev'" in message and str(store) in message
    with pytest.raises(StoreNotReady, match="'ghost'"):
        read(StoreReader(store, "ghost", SIGNALS))


def test_an_empty_or_foreign_file_is_not_ready(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.write_bytes(b"")
    with pytest.raises(StoreNotReady, match=str(empty)):
        read(StoreReader(empty, "dev", SIGNALS))
    foreign = tmp_path / "notes.txt"
    foreign.write_text("not a store" * 20)
    with pytest.raises(StoreNotReady, match=str(foreign)):
        read(StoreReader(foreign, "dev", SIGNALS))


def _fingerprint(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_the_reader_never_writes(tmp_path: Path) -> None:
    folder = tmp_path / "bridge"
    store = folder / "samples.db"
    write(store, [polls(0, 500)])
    before = _fingerprint(folder)
    assert set(before) == {"samples.db"}  # handed back: no -wal, no -shm
    reader = StoreReader(store, "dev", SIGNALS, since_s=50.0, chunk=16)
    read(reader)
    read(reader)
    with pytest.raises(StoreNotReady):
        read(StoreReader(store, "dev", ("a", "nope")))
    assert _fingerprint(folder) == before  # same files, same bytes, same mtimes


def test_chunks_stay_bounded_on_a_large_store(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    write(store, [polls(i, 10_000) for i in range(0, 100_000, 10_000)])  # 400,000 samples
    chunk = 1000
    reader = StoreReader(store, "dev", SIGNALS, chunk=chunk)
    rows = 0
    for raw in reader.read_new():
        assert np.isfinite(raw.values).sum() <= chunk
        rows += len(raw)
    assert rows == 100_000 and reader.samples_read == 300_000


def _vm_steps(monkeypatch: pytest.MonkeyPatch, reader: StoreReader) -> int:
    """SQLite virtual-machine steps of one read_new call: the cost of a read, free of timing."""
    steps = [0]
    real = samples.connect

    def counting(path: str | Path, readonly: bool = False, timeout: float = 10.0) -> object:
        conn = real(path, readonly=readonly, timeout=timeout)

        def tick() -> int:
            steps[0] += 1
            return 0

        conn.set_progress_handler(tick, 100)
        return conn

    monkeypatch.setattr(samples, "connect", counting)
    read(reader)
    monkeypatch.setattr(samples, "connect", real)
    return steps[0]


def test_an_incremental_read_costs_what_is_new_not_what_the_store_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cost = {}
    for size in (1_000, 100_000):
        store = tmp_path / f"samples-{size}.db"
        write(store, [polls(0, size)])
        reader = StoreReader(store, "dev", SIGNALS)
        read(reader)
        write(store, [polls(size, 5)])
        cost[size] = _vm_steps(monkeypatch, reader)
    assert cost[100_000] <= 2 * cost[1_000] + 20, cost


def test_a_replaced_store_is_read_from_its_start(tmp_path: Path) -> None:
    # the bridge's folder was wiped (or the file restored from elsewhere): the new file's
    # samples have append positions the reader has already passed in the old one
    store = tmp_path / "samples.db"
    write(store, [polls(0, 300)])
    reader = StoreReader(store, "dev", SIGNALS)
    assert len(read(reader)[1].time) == 300
    store.unlink()
    write(store, [polls(300, 4)])
    assert polls_of(read(reader)[1]) == [300, 301, 302, 303]


def test_a_missing_value_is_nan_in_its_row(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    write(store, [[Sample("dev", "a", 5.0, math.nan), Sample("dev", "b", 5.0, 2.0),
                   Sample("dev", "c", 5.0, 3.0)]])
    _, rows = read(StoreReader(store, "dev", SIGNALS))
    assert math.isnan(rows.values[0, 0]) and rows.values[0, 1:].tolist() == [2.0, 3.0]

