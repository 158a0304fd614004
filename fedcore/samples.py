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

Durability: WAL journal while a writer has the file open (rollback journal at rest, see
below), ``synchronous=NORMAL``. A writer killed at any point (kill -9)
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

Readers without write access
----------------------------
On a gateway the edge agent reads the store through a read-only mount of the bridge's
folder (``ReadOnlyPaths=`` in its unit) and is no member of the writer's user, so it can
neither create nor write the ``-wal``/``-shm`` files. SQLite (>= 3.22) still reads a WAL
database read-only, but only while those two files exist: they do while the bridge runs and
after it crashed (kill -9, power loss), and a read-only reader then works from them. When
the last writer closes cleanly, SQLite deletes them, and the store becomes unreadable to
such a reader ("attempt to write a readonly database"). Hence the rule: **a writer hands the
store back in rollback-journal mode when it stops** (:func:`close_writer`:
``journal_mode=DELETE``, which also checkpoints), and switches it to WAL again when it opens
it. A rollback-journal file needs nothing but itself to be read. If a reader is connected at
that moment the switch is refused (it needs an exclusive lock; a connected WAL reader holds a
shared one), and the same lock keeps SQLite from deleting the files when the writer closes:
they stay, and later readers use them.

Rejected alternatives: opening with ``immutable=1`` when the files are missing (a writer
that starts while that connection is open rewrites pages under it during a checkpoint:
silently wrong reads); keeping the files with ``SQLITE_FCNTL_PERSIST_WAL`` (not reachable
from Python's sqlite3); giving the edge write access to the bridge's folder (it could then
damage the bridge's data, and a reader should not need it).

``connect(path, readonly=True)`` therefore never writes, creates or chmods anything, even
where it could (root, a writable folder): it checks first that the file exists, and, unless
both ``-wal`` and ``-shm`` exist, that it is an SQLite database in rollback-journal mode
(in WAL mode without them SQLite would create them); otherwise it raises
:class:`StoreUnavailable` naming the file and the reason. It reads that header through a
descriptor it keeps open: closing any descriptor of a file drops every lock the process's
other connections hold on it. Then it opens with ``mode=ro&readonly_shm=1`` (SQLite opens
the ``-shm`` read-only and never writes to it) and ``query_only``. (Run as root, SQLite
re-asserts the owner of the ``-wal`` and ``-shm`` files it opens: a chown to the owner they
already have, which changes nothing but their ctime.) A read-only ``-shm`` cannot take part
in WAL recovery, so a read may fail with ``SQLITE_READONLY_RECOVERY`` while the writer
restarts its WAL (measured: 2 in 3.2 million reads against a writer committing every 2 ms);
the connection retries such statements for up to ``timeout`` seconds.
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fedcore.errors import FedgateError, LocalProtocolError

log = logging.getLogger("fedgate.samples")

SCHEMA_VERSION = 1
_SQLITE_MAGIC = b"SQLite format 3\x00"
_WAL_FORMAT = 2  # header bytes 18-19 (write and read format versions): 2 = WAL, 1 = rollback
# Errors a read-only reader may see for an instant while the writer restarts its WAL.
_TRANSIENT_READ_ERRORS = frozenset({"SQLITE_READONLY_RECOVERY", "SQLITE_BUSY_RECOVERY"})

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


class StoreUnavailable(FedgateError):
    """The sample store cannot be opened for reading (yet); names the file and the reason."""

    exit_code = 69  # EX_UNAVAILABLE: the bridge has not written it yet, try again later

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"sample store {self.path}: {reason}")


def connect(path: str | Path, readonly: bool = False, timeout: float = 10.0) -> sqlite3.Connection:
    """Open the sample file with the settings every user must share (WAL, NORMAL sync).

    ``readonly=True`` never writes, creates or chmods anything (module docstring) and raises
    :class:`StoreUnavailable` when the store cannot be read as it is."""
    if readonly:
        return _connect_readonly(Path(path), timeout)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(path), timeout=timeout, isolation_level=None)
    # Another process may hold the write lock briefly; wait rather than fail.
    conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
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


def close_writer(conn: sqlite3.Connection) -> bool:
    """Close a writer's connection, handing the store back in rollback-journal mode so that
    read-only readers can open it without the WAL files (module docstring).

    Returns False when a reader is connected: the store then stays in WAL mode, and the
    reader's connection keeps SQLite from deleting the -wal and -shm files."""
    handed_back = False
    try:
        conn.execute("PRAGMA busy_timeout = 0")  # a connected reader will not leave soon
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()
        handed_back = mode is not None and str(mode[0]).lower() == "delete"
    except sqlite3.OperationalError as exc:  # "database is locked": a reader holds it
        log.info("sample store stays in WAL mode (%s): a reader is connected", exc)
    finally:
        conn.close()
    return handed_back


class _ReadOnlyConnection(sqlite3.Connection):
    """A reader's connection: statements retry the transient errors of a read-only -shm."""

    retry_for = 10.0

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        deadline = time.monotonic() + self.retry_for
        pause = 0.001
        while True:
            try:
                return super().execute(sql, parameters)
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorname", "") not in _TRANSIENT_READ_ERRORS:
                    raise
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 0.05)


def _connect_readonly(path: Path, timeout: float) -> sqlite3.Connection:
    _check_readable(path)
    uri = f"file:{quote(str(path))}?mode=ro&readonly_shm=1"
    try:
        conn = sqlite3.connect(
            uri, uri=True, timeout=timeout, isolation_level=None, factory=_ReadOnlyConnection
        )
    except sqlite3.Error as exc:
        raise StoreUnavailable(path, f"cannot be opened read-only: {exc}") from exc
    assert isinstance(conn, _ReadOnlyConnection)
    conn.retry_for = timeout
    try:
        conn.execute("PRAGMA query_only = 1")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.Error as exc:
        conn.close()
        raise StoreUnavailable(path, f"cannot be read: {exc}") from exc
    if row is None or int(row[0]) != SCHEMA_VERSION:
        conn.close()
        found = "no schema version" if row is None else f"sample schema {row[0]}"
        raise LocalProtocolError(f"{path}: {found}, this code reads {SCHEMA_VERSION}")
    return conn


def _check_readable(path: Path) -> None:
    """Refuse, before SQLite sees it, a store that a read-only open would have to change."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise StoreUnavailable(
            path, "does not exist yet (the bridge creates it on its first flush)"
        ) from None
    except OSError as exc:
        raise StoreUnavailable(path, f"cannot be read: {exc.strerror}") from exc
    if Path(f"{path}-wal").exists() and Path(f"{path}-shm").exists():
        return  # a running or crashed writer's files: SQLite reads them, creates nothing
    header = _header(path, stat)
    if len(header) < 100 or not header.startswith(_SQLITE_MAGIC):
        what = "is empty" if not header else "is not an SQLite database"
        raise StoreUnavailable(path, f"{what} (not a sample store yet)")
    if _WAL_FORMAT in (header[18], header[19]):
        missing = [s for s in ("-wal", "-shm") if not Path(f"{path}{s}").exists()]
        raise StoreUnavailable(
            path,
            f"is in WAL mode but its {' and '.join(missing)} "
            f"{'file is' if len(missing) == 1 else 'files are'} missing, and a read-only "
            "reader may not create them: its writer stopped without handing it "
            "back (fedcore.samples.close_writer); start the bridge, or stop it cleanly once",
        )


# Closing any descriptor of a file drops every POSIX lock this process holds on it, those of
# its SQLite connections included (fcntl(2)): the header is read through one descriptor per
# file that stays open for the life of the process.
_header_fds: dict[tuple[int, int], int] = {}
_header_lock = threading.Lock()


def _header(path: Path, stat: os.stat_result) -> bytes:
    key = (stat.st_dev, stat.st_ino)
    with _header_lock:
        fd = _header_fds.get(key)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise StoreUnavailable(path, f"cannot be read: {exc.strerror}") from exc
            if os.fstat(fd).st_ino != stat.st_ino:  # replaced since the stat: do not keep it
                os.close(fd)
                raise StoreUnavailable(path, "was replaced while being opened; try again")
            _header_fds[key] = fd
        return os.pread(fd, 100, 0)


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

    def close(self) -> bool:
        """Close, handing the store back to read-only readers (see :func:`close_writer`)."""
        return close_writer(self.conn)


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
