"""The bridge's store as its readers find it: a read-only connection never changes anything.

``fedcore.samples.connect(path, readonly=True)`` is how the edge agent reads what the bridge
wrote. These tests run as whoever runs the suite (root on CI, with write access the agent
does not have) and check the folder is left exactly as it was; tests/test_unit_sandbox.py
runs the same reader with no write access at all, under the edge unit.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.samples import Sample, SampleWriter, StoreUnavailable, connect


def snapshot(folder: Path) -> dict[str, tuple[str, int, int, int, int]]:
    """Every file with a hash of its bytes, its modification time, mode and owner.

    Not its change time: SQLite run by root fchowns the -wal and -shm files it opens to the
    owner they already have (so that root never takes them from the writer), which touches
    only that."""
    return {
        p.name: (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            s.st_mtime_ns,
            s.st_mode,
            s.st_uid,
            s.st_gid,
        )
        for p in folder.iterdir()
        for s in [p.stat()]
    }


def write_store(path: Path, rows: int = 50) -> None:
    writer = SampleWriter(path)
    writer.write([Sample("d", "x", float(t), float(t)) for t in range(rows)])
    assert writer.close()  # nobody else connected: handed back in rollback-journal mode


def count(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT count(*) FROM samples").fetchone()[0])


def test_a_missing_store_is_named_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable) as err:
        connect(tmp_path / "samples.db", readonly=True)
    assert err.value.path == tmp_path / "samples.db" and "does not exist yet" in err.value.reason
    assert str(tmp_path / "samples.db") in str(err.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "reason"), [(b"", "is empty"), (b"x" * 200, "not an SQLite")])
def test_a_file_that_is_no_store_is_refused(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / "samples.db").write_bytes(content)
    before = snapshot(tmp_path)
    with pytest.raises(StoreUnavailable, match=reason):
        connect(tmp_path / "samples.db", readonly=True)
    assert snapshot(tmp_path) == before


def test_a_cleanly_closed_store_reads_without_wal_files(tmp_path: Path) -> None:
    write_store(tmp_path / "samples.db")
    before = snapshot(tmp_path)
    assert set(before) == {"samples.db"}
    conn = connect(tmp_path / "samples.db", readonly=True)
    assert count(conn) == 50
    with pytest.raises(sqlite3.OperationalError):
        conn.execute("DELETE FROM samples")
    conn.close()
    assert snapshot(tmp_path) == before


def test_a_crashed_writers_files_are_read_as_they_are(tmp_path: Path) -> None:
    crash = (
        "import os, sys\n"
        "from fedcore.samples import Sample, SampleWriter\n"
        "w = SampleWriter(sys.argv[1])\n"
        "w.write([Sample('d', 'x', float(t), 1.0) for t in range(30)])\n"
        "os._exit(0)\n"  # like kill -9: no close, the -wal and -shm files stay
    )
    subprocess.run([sys.executable, "-c", crash, str(tmp_path / "samples.db")], check=True)
    before = snapshot(tmp_path)
    assert set(before) == {"samples.db", "samples.db-wal", "samples.db-shm"}
    conn = connect(tmp_path / "samples.db", readonly=True)
    assert count(conn) == 30
    conn.close()
    assert snapshot(tmp_path) == before


def test_a_wal_store_without_its_files_is_refused_not_repaired(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    write_store(path)
    plain = sqlite3.connect(path)  # a writer that does not hand the store back
    plain.execute("PRAGMA journal_mode = WAL")
    plain.close()  # SQLite deletes -wal and -shm: WAL mode, no files
    before = snapshot(tmp_path)
    with pytest.raises(StoreUnavailable, match="WAL mode but its -wal and -shm files are missing"):
        connect(path, readonly=True)
    assert snapshot(tmp_path) == before  # SQLite would have created an empty -wal here


def test_a_connected_reader_keeps_the_wal_files_when_the_writer_stops(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    writer = SampleWriter(path)
    writer.write([Sample("d", "x", 1.0, 1.0)])
    held = connect(path, readonly=True)
    assert count(held) == 1
    fresh = connect(path, readonly=True)  # opening and closing a second one in this process
    fresh.close()  # must not drop the first one's lock (fcntl: any close drops them all)
    writer.write([Sample("d", "x", 2.0, 2.0)])
    assert writer.close() is False  # the reader's lock refuses the hand-back...
    assert {"samples.db-wal", "samples.db-shm"} <= {p.name for p in tmp_path.iterdir()}
    assert count(held) == 2  # ...and keeps SQLite from deleting the files it reads
    late = connect(path, readonly=True)
    assert count(late) == 2
    late.close()
    held.close()


def test_the_writer_switches_back_to_wal_on_open(tmp_path: Path) -> None:
    path = tmp_path / "samples.db"
    write_store(path)
    reader = connect(path, readonly=True)  # opened while the store is in rollback mode
    writer = SampleWriter(path)
    assert writer.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    writer.write([Sample("d", "x", 99.0, 1.0)])
    assert count(reader) == 51  # the reader follows the switch
    reader.close()
    assert writer.close()
    assert os.listdir(tmp_path) == ["samples.db"]
