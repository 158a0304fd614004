"""From raw samples to training rows: the gateway's task definition, pure and bounded.

Theory of operation
-------------------
A gateway learns whatever its bridge records. ``[data]`` in its config names the task
(:class:`RowSpec`): the kind (regression, classification, anomaly = autoencoder), the
features and the target by signal name, how raw readings become rows, which rows are valid,
which are left out, and the local holdout. Nothing here knows a particular machine.

1. **Readings to raw rows** (``edge.store``): the signals read together (one Modbus
   request) share a timestamp; a raw row is such a set. With ``time_signal`` the device's
   own clock is the row time; with ``record_signal`` consecutive readings of the same
   device record (polling faster than the device updates) collapse into one row.
2. **Resampling** (``resample_s > 0``): raw rows fall into buckets of ``resample_s`` seconds
   of row time; each signal is aggregated over its bucket (``mean``, ``last``, ``min``,
   ``max``; missing values ignored) and the row's time is the bucket's start. Signals read
   by different requests (other periods or function codes, serial lines) only meet in a
   row through resampling. The newest bucket stays open until a later reading arrives.
3. **The window** (:class:`RowWindow`) keeps the newest ``window_rows`` rows and, with
   ``window_s``, only rows younger than that (by row time): memory is bounded whatever the
   store holds. Rows are added incrementally as the store grows.
4. **Gaps** (``fill_gap_s``): a missing value is carried forward from the previous row of
   the window when that row is at most ``fill_gap_s`` older; otherwise the row is incomplete
   and dropped.
5. **Valid rows** (``valid``: signal -> [low, high]) - a reading outside its range (a sensor
   glitch) drops the row; **left-out rows** (``exclude``: conditions joined by ``and``, such
   as ``P_avg <= 0 and Ws_avg > 4`` for a stopped turbine) are neither learned nor judged.
6. **Features** are signal names or ``sin(SIGNAL)`` / ``cos(SIGNAL)`` of an angle in degrees
   (a direction is circular: 359 and 1 degrees are neighbours).
7. **Holdout**: time blocks of ``holdout_block_s`` seconds (counted from
   ``holdout_origin_s``); every ``holdout_every``-th block
   is held out (never trained on) and training rows closer than ``embargo_s`` to a holdout
   block are dropped, so near-copies of holdout rows do not leak into training.

:func:`build` turns the window into unscaled training and holdout arrays; scaling with the
fleet scaler (which arrives in the model spec) happens in ``edge.data``. :func:`statistics`
gives the counts, sums and centred sums of squares of the federated statistics step.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

TASKS = ("regression", "classification", "anomaly")
AGGREGATES = ("mean", "last", "min", "max")
_SIGNAL = r"[A-Za-z0-9_.\-]{1,64}"
_FEATURE = re.compile(rf"^(?:(sin|cos)\(\s*({_SIGNAL})\s*\)|({_SIGNAL}))$")
_CLAUSE = re.compile(rf"^\s*({_SIGNAL})\s*(<=|>=|==|!=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")
_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "<=": operator.le, ">=": operator.ge, "<": operator.lt, ">": operator.gt,
    "==": operator.eq, "!=": operator.ne,
}


@dataclass(frozen=True, slots=True)
class Feature:
    text: str  # as written in the config, e.g. "sin(Wa_avg)"
    signal: str
    function: str = ""  # "" | "sin" | "cos"


def parse_feature(text: str) -> Feature:
    """``SIGNAL``, ``sin(SIGNAL)`` or ``cos(SIGNAL)``; raises ValueError otherwise."""
    match = _FEATURE.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"feature {text!r}: use a signal name, sin(SIGNAL) or cos(SIGNAL)")
    if match.group(3):
        return Feature(text, match.group(3))
    return Feature(text, match.group(2), match.group(1))


@dataclass(frozen=True, slots=True)
class Condition:
    signal: str
    op: str
    value: float


def parse_exclusion(text: str) -> tuple[Condition, ...]:
    """``"P_avg <= 0 and Ws_avg > 4"`` -> its conditions; raises ValueError otherwise."""
    clauses = re.split(r"\s+and\s+", text.strip()) if isinstance(text, str) else []
    out = []
    for clause in clauses:
        match = _CLAUSE.match(clause)
        if match is None:
            raise ValueError(f"condition {clause!r}: write SIGNAL OP NUMBER (OP one of "
                             f"{' '.join(_OPS)}), joined by 'and'")
        out.append(Condition(match.group(1), match.group(2), float(match.group(3))))
    if not out:
        raise ValueError("empty condition")
    return tuple(out)


@dataclass(frozen=True)
class RowSpec:
    """How this gateway's raw readings become rows (see the module docstring)."""

    task: str
    features: tuple[Feature, ...]
    target: str = ""  # empty for "anomaly"
    time_signal: str = ""
    record_signal: str = ""
    resample_s: float = 0.0
    aggregate: str = "mean"
    fill_gap_s: float = 0.0
    valid: tuple[tuple[str, float, float], ...] = ()
    exclude: tuple[tuple[Condition, ...], ...] = ()
    holdout_every: int = 5
    holdout_block_s: float = 86400.0
    holdout_origin_s: float = 0.0  # blocks are counted from this unix time
    embargo_s: float = 0.0
    window_rows: int = 50_000
    window_s: float = 0.0  # 0 = no age limit
    min_rows: int = 200  # training rows needed before the gateway takes part
    columns: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task {self.task!r} is not one of {', '.join(TASKS)}")
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"aggregate {self.aggregate!r} is not one of {', '.join(AGGREGATES)}")
        if not self.features:
            raise ValueError("no features")
        if (self.task == "anomaly") != (not self.target):
            raise ValueError("a target is needed for regression and classification, "
                             "and has no place in anomaly (the autoencoder rebuilds its features)")
        names = [f.signal for f in self.features] + ([self.target] if self.target else [])
        names += [s for s, _, _ in self.valid]
        names += [c.signal for group in self.exclude for c in group]
        object.__setattr__(self, "columns", tuple(dict.fromkeys(names)))

    @property
    def signals(self) -> tuple[str, ...]:
        """Every signal to read from the store: the columns, then the time and record
        signals that key the rows."""
        extra = [s for s in (self.time_signal, self.record_signal) if s and s not in self.columns]
        return self.columns + tuple(dict.fromkeys(extra))

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(f.text for f in self.features)


@dataclass(frozen=True, eq=False)
class RawRows:
    """Raw rows of one device in time order: ``time`` (n,), ``values`` (n, len(spec.signals))."""

    time: np.ndarray
    values: np.ndarray

    def __len__(self) -> int:
        return int(self.time.shape[0])


def empty_raw(width: int) -> RawRows:
    return RawRows(np.zeros(0), np.zeros((0, width)))


# ---- the window ---------------------------------------------------------------------------


@dataclass
class _Bucket:
    """Running aggregates of the open resampling bucket."""

    index: int
    sums: np.ndarray
    counts: np.ndarray
    mins: np.ndarray
    maxs: np.ndarray
    last: np.ndarray


class RowWindow:
    """The newest rows of one device, bounded by ``spec.window_rows`` and ``spec.window_s``.

    Pure and incremental: :meth:`add` takes raw rows in time order (each chunk the store
    reader returns) and keeps completed rows ``time`` (n,) and ``values`` (n, columns).
    ``late`` counts raw rows that arrived older than rows already kept (dropped); without
    resampling or a record number, a repeat of a kept row's time is dropped as the same row."""

    def __init__(self, spec: RowSpec) -> None:
        self.spec = spec
        width = len(spec.columns)
        self.time = np.zeros(0)
        self.values = np.zeros((0, width))
        self.late = 0
        self.added = 0  # rows completed since start (eviction does not lower it)
        self.record_resets = 0  # times the device's record number went back (a restart, a replay)
        self._open: _Bucket | None = None
        self._last_record: float | None = None

    def __len__(self) -> int:
        return int(self.time.shape[0])

    @property
    def newest_time(self) -> float:
        return float(self.time.max()) if len(self) else -math.inf

    def add(self, raw: RawRows) -> int:
        """Fold raw rows in; returns how many rows were completed."""
        if len(raw) == 0:
            return 0
        spec = self.spec
        time, values = raw.time.astype(np.float64), raw.values.astype(np.float64)
        signals = spec.signals
        if spec.record_signal:
            time, values = self._dedupe_records(time, values, signals.index(spec.record_signal))
        if spec.time_signal:
            time = values[:, signals.index(spec.time_signal)]
            ok = np.isfinite(time)
            time, values = time[ok], values[ok]
        values = values[:, : len(spec.columns)]
        if spec.record_signal and spec.resample_s <= 0:
            # rows are the device's records, in record order: a clock that repeats or steps
            # back (a logger's daylight-saving change) does not reorder or drop them
            self._append(time, values)
            return int(len(time))
        if len(time) and not np.all(np.diff(time) >= 0):
            order = np.argsort(time, kind="stable")
            time, values = time[order], values[order]
        floor = self._floor()
        late = time < floor
        if spec.resample_s > 0:
            fresh = ~late
        else:
            # a row's time is its key: a device clock polled faster than it ticks repeats
            # its time, in this chunk or the last one; the first reading is the row
            repeat = (time == floor) | np.concatenate([[False], time[1:] == time[:-1]])
            fresh = ~late & ~repeat
        self.late += int(late.sum())
        time, values = time[fresh], values[fresh]
        if spec.resample_s > 0:
            time, values = self._resample(time, values)
        self._append(time, values)
        return int(len(time))

    def _floor(self) -> float:
        """Raw rows at or before this time are late (their rows are already kept)."""
        if self.spec.resample_s > 0 and self._open is not None:
            return self._open.index * self.spec.resample_s
        return self.newest_time

    def _dedupe_records(self, time: np.ndarray, values: np.ndarray, col: int) -> tuple[np.ndarray, np.ndarray]:
        record = values[:, col]
        finite = np.isfinite(record)
        # each row is compared with the last record number read before it: a reading without
        # one (dropped) does not make the next reading of the same record new, in this chunk
        # or across a chunk boundary
        start = np.nan if self._last_record is None else self._last_record
        last = np.maximum.accumulate(np.where(finite, np.arange(len(record)), -1))
        before = np.concatenate([[-1], last[:-1]])
        prev = np.where(before >= 0, record[np.maximum(before, 0)], start)
        keep = finite & (record != prev)
        self.record_resets += int((finite & (record < prev)).sum())  # NaN prev compares False
        if finite.any():
            self._last_record = float(record[finite][-1])
        return time[keep], values[keep]

    def _resample(self, time: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Completed buckets as rows; the newest bucket stays open."""
        if len(time) == 0:
            return time, values
        width = values.shape[1]
        index = np.floor(time / self.spec.resample_s).astype(np.int64)
        starts = np.flatnonzero(np.concatenate([[True], index[1:] != index[:-1]]))
        finite = np.isfinite(values)
        zeroed = np.where(finite, values, 0.0)
        sums = np.add.reduceat(zeroed, starts, axis=0)
        counts = np.add.reduceat(finite.astype(np.float64), starts, axis=0)
        mins = np.minimum.reduceat(np.where(finite, values, np.inf), starts, axis=0)
        maxs = np.maximum.reduceat(np.where(finite, values, -np.inf), starts, axis=0)
        last = _last_finite(values, finite, starts)
        buckets = [_Bucket(int(index[s]), sums[i], counts[i], mins[i], maxs[i], last[i])
                   for i, s in enumerate(starts)]
        if self._open is not None and buckets[0].index == self._open.index:
            buckets[0] = _merge(self._open, buckets[0])
        elif self._open is not None:
            buckets.insert(0, self._open)
        self._open = buckets.pop()
        if not buckets:
            return np.zeros(0), np.zeros((0, width))
        rows = np.stack([self._aggregate(b) for b in buckets])
        times = np.array([b.index * self.spec.resample_s for b in buckets], dtype=np.float64)
        return times, rows

    def _aggregate(self, b: _Bucket) -> np.ndarray:
        how = self.spec.aggregate
        with np.errstate(invalid="ignore", divide="ignore"):
            if how == "mean":
                out = np.where(b.counts > 0, b.sums / np.maximum(b.counts, 1), np.nan)
            elif how == "min":
                out = np.where(b.counts > 0, b.mins, np.nan)
            elif how == "max":
                out = np.where(b.counts > 0, b.maxs, np.nan)
            else:
                out = b.last.copy()
        return out

    def _append(self, time: np.ndarray, values: np.ndarray) -> None:
        if len(time) == 0:
            return
        self.added += len(time)
        self.time = np.concatenate([self.time, time])
        self.values = np.concatenate([self.values, values])
        keep = np.ones(len(self.time), dtype=bool)
        if self.spec.window_s > 0:
            keep &= self.time >= self.time.max() - self.spec.window_s
        if keep.sum() > self.spec.window_rows:
            keep[: len(keep) - self.spec.window_rows] = False
        if not keep.all():
            self.time, self.values = self.time[keep], self.values[keep]


def _last_finite(values: np.ndarray, finite: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per segment and column, the last finite value (NaN where there is none)."""
    n = values.shape[0]
    position = np.where(finite, np.arange(n)[:, None], -1)
    ends = np.concatenate([starts[1:], [n]])
    last_pos = np.maximum.reduceat(position, starts, axis=0)
    out = np.full(last_pos.shape, np.nan)
    ok = (last_pos >= 0) & (last_pos < ends[:, None])
    rows, cols = np.nonzero(ok)
    out[rows, cols] = values[last_pos[rows, cols], cols]
    return out


def _merge(a: _Bucket, b: _Bucket) -> _Bucket:
    last = np.where(np.isfinite(b.last), b.last, a.last)
    return _Bucket(a.index, a.sums + b.sums, a.counts + b.counts, np.minimum(a.mins, b.mins),
                   np.maximum(a.maxs, b.maxs), last)


# ---- rows to arrays -----------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Built:
    """Unscaled arrays of one snapshot of the window. ``y_*`` is None for "anomaly"."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_holdout: np.ndarray
    y_holdout: np.ndarray | None
    t_train: np.ndarray
    rows: int  # rows in the window (before validity filters)
    usable: int  # valid rows, training + holdout
    newest_time: float


def fill_gaps(time: np.ndarray, values: np.ndarray, max_gap_s: float) -> np.ndarray:
    """Carry each column's last value forward over missing values, to at most ``max_gap_s``
    seconds after the reading it came from."""
    if max_gap_s <= 0 or len(time) == 0:
        return values
    out = values.copy()
    for col in range(values.shape[1]):
        finite = np.isfinite(values[:, col])
        source = np.where(finite, np.arange(len(time)), -1)
        source = np.maximum.accumulate(source)
        missing = ~finite & (source >= 0)
        age = time - time[np.maximum(source, 0)]
        use = missing & (age <= max_gap_s)
        out[use, col] = values[source[use], col]
    return out


def feature_matrix(spec: RowSpec, values: np.ndarray) -> np.ndarray:
    """The raw feature columns (``spec.features`` order) from window rows."""
    cols = []
    for feature in spec.features:
        column = values[:, spec.columns.index(feature.signal)]
        if feature.function == "sin":
            column = np.sin(np.deg2rad(column))
        elif feature.function == "cos":
            column = np.cos(np.deg2rad(column))
        cols.append(column)
    return np.stack(cols, axis=1) if cols else np.zeros((len(values), 0))


def _usable(spec: RowSpec, values: np.ndarray) -> np.ndarray:
    needed = [spec.columns.index(f.signal) for f in spec.features]
    if spec.target:
        needed.append(spec.columns.index(spec.target))
    ok = np.isfinite(values[:, needed]).all(axis=1)
    with np.errstate(invalid="ignore"):
        for signal, low, high in spec.valid:
            column = values[:, spec.columns.index(signal)]
            ok &= (column >= low) & (column <= high)
        for group in spec.exclude:
            hit = np.ones(len(values), dtype=bool)
            for c in group:
                hit &= _OPS[c.op](values[:, spec.columns.index(c.signal)], c.value)
            ok &= ~hit
    return ok


def holdout_split(t: np.ndarray, block: float, every: int, embargo: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, holdout) masks: every ``every``-th block of ``block`` seconds is holdout;
    training rows closer than ``embargo`` to a holdout block are in neither (any embargo,
    also one longer than a block)."""
    period = every * block
    u = np.mod(np.asarray(t, np.float64), period)  # position within a period; holdout at its end
    holdout = u >= (every - 1) * block
    train = ~holdout
    if embargo > 0:
        ahead, behind = (every - 1) * block - u, u  # to the next holdout block, from the last
        train &= (ahead > embargo) & (behind >= embargo)
    return train, holdout


def build(spec: RowSpec, window: RowWindow) -> Built:
    """Training and holdout arrays of the window as it is now (see the module docstring)."""
    time, values = window.time, fill_gaps(window.time, window.values, spec.fill_gap_s)
    ok = _usable(spec, values)
    if spec.holdout_every > 0:
        train, holdout = holdout_split(time - spec.holdout_origin_s, spec.holdout_block_s,
                                       spec.holdout_every, spec.embargo_s)
    else:
        train, holdout = np.ones(len(time), dtype=bool), np.zeros(len(time), dtype=bool)
    train &= ok
    holdout &= ok
    x = feature_matrix(spec, values)
    y = values[:, spec.columns.index(spec.target)] if spec.target else None
    return Built(
        x_train=x[train], y_train=None if y is None else y[train],
        x_holdout=x[holdout], y_holdout=None if y is None else y[holdout],
        t_train=time[train], rows=len(time), usable=int(ok.sum()),
        newest_time=window.newest_time,
    )


def statistics(task: str, features: Sequence[str], target: str, x: np.ndarray,
               y: np.ndarray | None) -> tuple[tuple[str, ...], int, np.ndarray, np.ndarray]:
    """(columns, count, sums, centred sums of squares) of training rows ``x`` (and ``y``):
    the features and, for regression, the target - all a fleet scaler needs, and no row.
    Centred about the local mean so that a column far from zero (pressure in Pa) keeps
    its spread in float64."""
    columns = tuple(features)
    data = np.asarray(x, np.float64)
    if task == "regression" and y is not None:
        columns = (*columns, target)
        data = np.column_stack([data, np.asarray(y, np.float64)])
    sums = data.sum(axis=0)
    centred = data - sums / max(1, data.shape[0])
    return columns, int(data.shape[0]), sums, np.square(centred).sum(axis=0)
