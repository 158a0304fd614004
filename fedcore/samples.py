"""The sample store file: the one interface between the field bus and the edge trainer.

The bridge (``firmware_bridge``) writes samples; the edge service (``edge.store``) reads and
trims them. The services never import each other: both use this module, which owns the
schema, the connection settings, the writer and the eviction policy, so that there is one
definition of each.

Schema (version 1) — a long table, one row per reading::

    signals(id INTEGER PRIMARY KEY, device TEXT, name TEXT, unit TEXT, UNIQUE(device, name))
    samples(signal INTEGER REFERENCES signals(id), ts REAL, value REAL)   -- rowid = append order
    INDEX samples_by_signal ON samples(signal, ts)
    meta(key TEXT PRIMARY KEY, value TEXT)                                -- schema_version

``ts`` is Unix time in seconds at which the bridge read the value; every signal read in one
Modbus request shares the same ``ts``, which is how readers rebuild wide rows. ``value`` is
the engineering value (after scale and offset); a NaN (e.g. a float register holding NaN) is
stored as NULL and read back as NaN. A long table was chosen over wide rows because devices
have different signals, periods and outages: a missing reading is a missing row, not a
column of NULLs, and adding a signal needs no migration.

Durability: WAL journal, ``synchronous=NORMAL``. A writer killed at any point (kill -9)
loses only its uncommitted batch and never corrupts the file; on power loss the last
committed batches may roll back, but the file stays consistent (SQLite's WAL guarantees).

Eviction policy (:func:`evict`), run by the writer after commits and by the edge store:

1. Age: samples older than ``now - max_age_s`` are deleted, judged in append order: every
   sample appended before the first one younger than the cut goes (the bridge appends in
   time order, so this is exact unless the clock stepped back).
2. Size: while the pages in use exceed ``max_bytes``, the oldest 10% of samples (by append
   order) are deleted. Freed pages are reused, so the file stops growing near
   ``max_bytes`` without a VACUUM (which would rewrite the whole file on an SD card).

Oldest first, always: training wants the most recent behaviour of the machine.
"""

from __future__ import annotations

import math
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedcore.errors import LocalProtocolError

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS signals(
    id INTEGER PRIMARY KEY,
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    unit TEXT NOT NULL DEFAULT '',
    UNIQUE(device, name)
);
CREATE TABLE IF NOT EXISTS samples(
    signal INTEGER NOT NULL REFERENCES signals(id),
    ts REAL NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS samples_by_signal ON samples(signal, ts);
"""


@dataclass(frozen=True, slots=True)
class Sample:
    device: str
    signal: str
    ts: float
    value: float
    unit: str = ""


@dataclass(frozen=True, slots=True)
class EvictionResult:
    by_age: int
    by_size: int


def connect(path: str | Path, readonly: bool = False, timeout: float = 10.0) -> sqlite3.Connection:
    """Open the sample file with the settings every user must share (WAL, NORMAL sync)."""
    if readonly:
        conn = sqlite3.connect(f"file:{Path(path)}?mode=ro", uri=True, timeout=timeout)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    # Another process may hold the write lock briefly; wait rather than fail.
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
    if not readonly:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # Keep the WAL file from growing past 16 MB after a checkpoint.
        conn.execute("PRAGMA journal_size_limit = 16777216")
        conn.executescript(_SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) != SCHEMA_VERSION:
            raise LocalProtocolError(
                f"{path}: sample schema {row[0]}, this code reads {SCHEMA_VERSION}"
            )
    return conn


class SampleWriter:
    """Appends batches of samples; one transaction per batch (all or nothing)."""

    def __init__(
        self, path: str | Path, max_bytes: int | None = None, max_age_s: float | None = None
    ) -> None:
        self.path = Path(path)
        self.conn = connect(self.path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self._ids: dict[tuple[str, str], int] = {}
        self.written = 0

    def _signal_id(self, device: str, name: str, unit: str) -> int:
        key = (device, name)
        sid = self._ids.get(key)
        if sid is None:
            self.conn.execute(
                "INSERT OR IGNORE INTO signals(device, name, unit) VALUES (?, ?, ?)",
                (device, name, unit),
            )
            sid = int(
                self.conn.execute(
                    "SELECT id FROM signals WHERE device = ? AND name = ?", (device, name)
                ).fetchone()[0]
            )
            self._ids[key] = sid
        return sid

    def write(self, samples: Sequence[Sample]) -> int:
        """Commit ``samples`` atomically; returns how many were written."""
        if not samples:
            return 0
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            rows = [
                (
                    self._signal_id(s.device, s.signal, s.unit),
                    s.ts,
                    None if math.isnan(s.value) else s.value,
                )
                for s in samples
            ]
            self.conn.executemany("INSERT INTO samples(signal, ts, value) VALUES (?, ?, ?)", rows)
            self.conn.execute("COMMIT")
        except BaseException:
            self.conn.execute("ROLLBACK")
            self._ids.clear()  # ids inserted in the rolled-back transaction are gone
            raise
        self.written += len(rows)
        return len(rows)

    def evict(self, now: float) -> EvictionResult:
        if self.max_bytes is None or self.max_age_s is None:
            return EvictionResult(0, 0)
        return evict(self.conn, self.max_bytes, self.max_age_s, now)

    def close(self) -> None:
        self.conn.close()


def used_bytes(conn: sqlite3.Connection) -> int:
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    free = conn.execute("PRAGMA freelist_count").fetchone()[0]
    size = conn.execute("PRAGMA page_size").fetchone()[0]
    return int((pages - free) * size)


def evict(conn: sqlite3.Connection, max_bytes: int, max_age_s: float, now: float) -> EvictionResult:
    """Apply the eviction policy (module docstring). ``now`` is Unix time in seconds."""
    # Appends arrive in time order, so the first young row (in rowid order) marks the
    # cut: this scans only the rows about to go instead of the whole table.
    first_young = conn.execute(
        "SELECT rowid FROM samples WHERE ts >= ? ORDER BY rowid LIMIT 1", (now - max_age_s,)
    ).fetchone()
    if first_young is None:
        by_age = conn.execute("DELETE FROM samples").rowcount
    else:
        by_age = conn.execute("DELETE FROM samples WHERE rowid < ?", (first_young[0],)).rowcount
    by_size = 0
    while used_bytes(conn) > max_bytes:
        total = conn.execute("SELECT count(*) FROM samples").fetchone()[0]
        if total == 0:
            break
        cut = max(1, total // 10)
        by_size += conn.execute(
            "DELETE FROM samples WHERE rowid IN (SELECT rowid FROM samples ORDER BY rowid LIMIT ?)",
            (cut,),
        ).rowcount
    return EvictionResult(int(by_age), by_size)


def signal_ids(conn: sqlite3.Connection, device: str, names: Iterable[str]) -> dict[str, int]:
    """Map signal names of ``device`` to their ids (names never written are absent)."""
    wanted = list(names)
    rows = conn.execute("SELECT name, id FROM signals WHERE device = ?", (device,)).fetchall()
    found = {str(n): int(i) for n, i in rows}
    return {n: found[n] for n in wanted if n in found}
