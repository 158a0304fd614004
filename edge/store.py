"""Reading the sample store the bridge writes (schema and writer: :mod:`fedcore.samples`).

:class:`StoreReader` is the gateway's training path: read-only (the gateway's unit mounts
the bridge's folder read-only), incremental (each call returns what was appended since the
last, by the store's append order ``rowid``) and bounded (chunks of at most ``chunk``
samples; the rows are kept by ``edge.rows.RowWindow``). It turns the long table back into
raw rows: every value read by one Modbus request shares its ``ts``, so a raw row is the set
of the task's signals with one ``ts`` (a signal missing from it is NaN there). What a row
means - device time, record numbers, resampling, the task's columns - is ``edge.rows``'s.

:class:`SampleStore` is the tool view of a store (tests, the field-bus demo's check that
every row crossed the bus intact): counts, signals, wide rows with a record number or a
device clock as key, appends and eviction. A store that cannot be read yet is
:class:`StoreNotReady` for the gateway - a reason to wait, never to fail.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fedcore import samples as sample_file
from fedcore.errors import LocalProtocolError
from fedcore.samples import EvictionResult, Sample

if TYPE_CHECKING:
    from edge.rows import RawRows



@dataclass(frozen=True)
class Rows:
    """Wide rows of one device: ``time`` (n,) and ``values`` (n, len(columns)) float32."""

    columns: tuple[str, ...]
    time: np.ndarray  # float64 bridge time, or int64 device time when a time_signal is used
    values: np.ndarray


class SampleStore:
    """Open (or create) the sample file at ``path`` with its size and age bounds; tools and
    tests use it (the gateway's training path reads through :class:`StoreReader`)."""

    def __init__(
        self, path: str | Path, max_bytes: int = 256 * 1024 * 1024, max_age_s: float = 30 * 86400.0,
        readonly: bool = False,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_s = max_age_s
        self.readonly = readonly
        self.conn = sample_file.connect(self.path, readonly=readonly)
        self._writer: sample_file.SampleWriter | None = None

    def append(self, batch: Sequence[Sample]) -> int:
        """Append samples atomically (the bridge has its own writer; this serves tools and tests)."""
        if self._writer is None:
            self._writer = sample_file.SampleWriter(self.path, self.max_bytes, self.max_age_s)
        return self._writer.write(batch)

    def evict(self, now: float) -> EvictionResult:
        """Apply the eviction policy of :mod:`fedcore.samples`; ``now`` is Unix seconds."""
        return sample_file.evict(self.conn, self.max_bytes, self.max_age_s, now)

    def count(self, device: str | None = None) -> int:
        if device is None:
            return int(self.conn.execute("SELECT count(*) FROM samples").fetchone()[0])
        return int(
            self.conn.execute(
                "SELECT count(*) FROM samples JOIN signals ON signals.id = samples.signal WHERE device = ?",
                (device,),
            ).fetchone()[0]
        )

    def devices(self) -> list[str]:
        return [
            str(r[0])
            for r in self.conn.execute("SELECT DISTINCT device FROM signals ORDER BY device")
        ]

    def signals(self, device: str) -> dict[str, str]:
        """Signal name -> unit for ``device``."""
        rows = self.conn.execute(
            "SELECT name, unit FROM signals WHERE device = ? ORDER BY id", (device,)
        )
        return {str(n): str(u) for n, u in rows}

    def rows(
        self,
        device: str,
        columns: Sequence[str],
        time_signal: str | None = None,
        since: float | None = None,
        seq_signal: str | None = None,
    ) -> Rows:
        """Rebuild wide rows of ``columns`` for ``device`` (see the module docstring).

        ``time_signal``: a signal holding the device's own Unix time, used as the row time.
        ``seq_signal``: a signal holding the device's record number; rows are then one per
        record, in record order (a clock alone can repeat, e.g. at a clock change)."""
        extra = [s for s in (time_signal, seq_signal) if s and s not in columns]
        wanted = list(dict.fromkeys([*columns, *extra]))
        ids = sample_file.signal_ids(self.conn, device, wanted)
        k = len(columns)
        if len(ids) < len(wanted):
            if len(ids) == 0:
                return _empty(columns, time_signal)
            missing = sorted(set(wanted) - set(ids))
            raise LocalProtocolError(f"device {device!r} has no signal(s) {missing} in {self.path}")
        col_of = {ids[name]: j for j, name in enumerate(wanted)}
        marks = ",".join("?" * len(ids))
        sql = f"SELECT signal, ts, value FROM samples WHERE signal IN ({marks})"
        params: list[object] = list(ids.values())
        if since is not None:
            sql += " AND ts >= ?"
            params.append(since)
        raw = self.conn.execute(sql, params).fetchall()
        if not raw:
            return _empty(columns, time_signal)
        sig = np.fromiter((r[0] for r in raw), dtype=np.int64, count=len(raw))
        ts = np.fromiter((r[1] for r in raw), dtype=np.float64, count=len(raw))
        val = np.fromiter(
            (np.nan if r[2] is None else r[2] for r in raw), dtype=np.float64, count=len(raw)
        )
        stamps, row = np.unique(ts, return_inverse=True)
        col = np.vectorize(col_of.__getitem__, otypes=[np.int64])(sig)
        table = np.full((len(stamps), len(wanted)), np.nan)
        seen = np.zeros((len(stamps), len(wanted)), dtype=bool)
        table[row, col] = val
        seen[row, col] = True
        complete = seen.all(axis=1)
        table, stamps = table[complete], stamps[complete]
        if time_signal is None and seq_signal is None:
            return Rows(tuple(columns), stamps, table[:, :k].astype(np.float32))
        key_signal = seq_signal or time_signal
        assert key_signal is not None
        key = table[:, wanted.index(key_signal)]
        ok = np.isfinite(key)
        if time_signal is not None:
            ok &= np.isfinite(table[:, wanted.index(time_signal)])
        table, stamps, key = table[ok], stamps[ok], key[ok].astype(np.int64)
        # First reading of each record (or device time), in record order.
        _, first = np.unique(key, return_index=True)
        table, stamps = table[first], stamps[first]
        if time_signal is None:
            return Rows(tuple(columns), stamps, table[:, :k].astype(np.float32))
        device_time = table[:, wanted.index(time_signal)].astype(np.int64)
        return Rows(tuple(columns), device_time, table[:, :k].astype(np.float32))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self.readonly:
            self.conn.close()
        else:
            sample_file.close_writer(self.conn)  # hand the store back to read-only readers


class StoreNotReady(Exception):
    """The store cannot give rows yet (no file, or the device's signals are not in it):
    the gateway waits and says why, it does not fail."""


class StoreReader:
    """Read-only, incremental, bounded reader of one device's signals (the training path).

    Each :meth:`read_new` returns the samples appended since the previous call, as raw rows
    in chunks of at most ``chunk`` samples, so memory stays bounded however much the store
    holds. The first call starts ``since_s`` seconds before the newest sample when given
    (the window's age limit), else at the oldest sample still in the store. Progress is
    kept as the store's append order (``rowid``), never re-reading a sample; eviction only
    removes samples older than those. The file is opened read-only for each call (the
    gateway's unit mounts the bridge's folder read-only; a replaced file is picked up, and
    read from its start when its samples end before that position)."""

    def __init__(self, path: str | Path, device: str, signals: Sequence[str],
                 since_s: float = 0.0, chunk: int = 200_000) -> None:
        self.path = Path(path)
        self.device = device
        self.signals = tuple(signals)
        self.since_s = since_s
        self.chunk = chunk
        self.last_rowid: int | None = None
        self.samples_read = 0

    def read_new(self) -> Iterator[RawRows]:
        """Raw rows appended since the last call, chunk by chunk; raises StoreNotReady."""
        try:
            exists = self.path.exists()
        except OSError as exc:  # a folder on the way this user may not search
            raise StoreNotReady(f"cannot reach store {self.path}: {exc.strerror or exc} (is this "
                                "service's user in the bridge's group?)") from None
        if not exists:
            raise StoreNotReady(f"store {self.path} does not exist yet (is the bridge running?)")
        try:
            conn = sample_file.connect(self.path, readonly=True)
        except sample_file.StoreUnavailable as exc:
            raise StoreNotReady(str(exc)) from None
        except (sqlite3.Error, OSError, LocalProtocolError) as exc:
            raise StoreNotReady(f"cannot open store {self.path}: {exc}") from None
        try:
            yield from self._read(conn)
        except sqlite3.Error as exc:
            raise StoreNotReady(f"cannot read store {self.path}: {exc}") from None
        finally:
            conn.close()

    def _read(self, conn: sqlite3.Connection) -> Iterator[RawRows]:

        ids = sample_file.signal_ids(conn, self.device, self.signals)
        if len(ids) < len(self.signals):
            missing = [s for s in self.signals if s not in ids]
            raise StoreNotReady(f"device {self.device!r} has no signal(s) {', '.join(missing)} "
                                f"in {self.path} yet")
        col_of = {sid: j for j, sid in enumerate(ids[s] for s in self.signals)}
        marks = ",".join("?" * len(col_of))
        if self.last_rowid is not None:
            top = conn.execute("SELECT max(rowid) FROM samples").fetchone()[0]
            if (top or 0) < self.last_rowid:  # a new (or emptied) file: all of it is new
                self.last_rowid = None
        if self.last_rowid is None:
            self.last_rowid = self._start(conn, list(col_of), marks)
        # "+signal": walk the rowid range after the position (what is new), not the signals'
        # index, which would visit every sample of the signals on every call
        sql = (f"SELECT rowid, signal, ts, value FROM samples WHERE rowid > ? AND +signal IN "
               f"({marks}) ORDER BY rowid LIMIT ?")
        while True:
            raw = conn.execute(sql, [self.last_rowid, *col_of, self.chunk]).fetchall()
            if not raw:
                return
            full = len(raw) == self.chunk
            rowid = np.fromiter((r[0] for r in raw), np.int64, len(raw))
            ts = np.fromiter((r[2] for r in raw), np.float64, len(raw))
            if full:  # the last timestamp may continue in the next chunk: read it again then
                same = ts == ts[-1]
                start = len(ts) - int(np.argmin(same[::-1])) if not same.all() else 0
                if start == 0:
                    raise StoreNotReady(f"{self.chunk} samples share one timestamp in {self.path}")
                raw, rowid, ts = raw[:start], rowid[:start], ts[:start]  # only the trailing run
            self.last_rowid = int(rowid[-1])
            self.samples_read += len(raw)
            yield _wide(raw, ts, col_of, len(self.signals))
            if not full:
                return

    def _start(self, conn: sqlite3.Connection, ids: list[int], marks: str) -> int:
        """The rowid to read after on the first call."""
        if self.since_s <= 0:
            return 0
        newest = conn.execute(f"SELECT max(ts) FROM samples WHERE signal IN ({marks})", ids).fetchone()[0]
        if newest is None:
            return 0
        first = conn.execute(f"SELECT min(rowid) FROM samples WHERE signal IN ({marks}) AND ts >= ?",
                             [*ids, float(newest) - self.since_s]).fetchone()[0]
        return max(0, int(first) - 1) if first is not None else 0


def _wide(raw: list[tuple[int, int, float, float | None]], ts: np.ndarray,
          col_of: dict[int, int], width: int) -> RawRows:
    """Long samples -> one row per timestamp; a row missing a signal keeps NaN there."""
    from edge.rows import RawRows

    sig = np.fromiter((r[1] for r in raw), np.int64, len(raw))
    val = np.fromiter((np.nan if r[3] is None else r[3] for r in raw), np.float64, len(raw))
    stamps, row = np.unique(ts, return_inverse=True)
    col = np.vectorize(col_of.__getitem__, otypes=[np.int64])(sig)
    table = np.full((len(stamps), width), np.nan)
    table[row, col] = val
    return RawRows(stamps, table)


def _empty(columns: Sequence[str], time_signal: str | None) -> Rows:
    dtype = np.int64 if time_signal else np.float64
    return Rows(tuple(columns), np.zeros((0,), dtype), np.zeros((0, len(columns)), np.float32))
