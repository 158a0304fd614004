"""Where a gateway's rows come from, and how they are scaled for the model it trains.

Two sources give the runtime the same thing, a :class:`Snapshot` of unscaled rows:

- :class:`StoreSource` (``data.source = "store"``, every real gateway): before each round
  it reads what the bridge appended to the sample store since the last read
  (``edge.store.StoreReader``), folds it into the bounded :class:`~edge.rows.RowWindow`
  and builds training and holdout rows from it (``edge.rows``). A store that does not
  exist yet, or lacks the task's signals, is a reason to wait, not to fail.
- :class:`DatasetSource` (``data.source = "dataset"``: the demo and the benchmarks): the
  rows of one unit of a packaged or CSV data set, already scaled by the data set.

:func:`scaled` turns a snapshot into the arrays training uses: store rows are standardised
with the fleet scaler carried by the model's spec (the federated statistics step), so every
gateway scales alike without any raw row leaving; data set rows are used as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from edge import rows as rowlib
from edge.store import StoreNotReady, StoreReader
from fedcore.protocol.messages import DataStats, ModelSpec

log = logging.getLogger("fedgate.edge")


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Unscaled rows at one moment. ``waiting`` says why the gateway cannot take part yet
    (empty when it can); ``rows_new`` counts training rows younger than the last trained."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_holdout: np.ndarray
    y_holdout: np.ndarray | None
    rows: int  # rows held (training + holdout + unusable)
    rows_new: int
    rows_needed: int
    newest_time: float
    waiting: str = ""
    scaled_already: bool = False  # data set rows (the demo): the data set scaled them
    target_scale: float = 1.0  # data set rows: errors are reported in the target's unit

    @property
    def ready(self) -> bool:
        return not self.waiting


@dataclass(frozen=True, eq=False)
class LocalData:
    """Scaled arrays for training and evaluation."""

    x_train: np.ndarray
    y_train: np.ndarray | None
    x_test: np.ndarray
    y_test: np.ndarray | None
    target_scale: float = 1.0


class DataSource(Protocol):
    def snapshot(self, trained_until: float) -> Snapshot:
        """The rows now; ``trained_until``: newest row time of the last training round."""
        ...

    def statistics(self, snap: Snapshot, lineage: str) -> DataStats:
        """Counts, sums and centred sums of squares of the snapshot's training rows."""
        ...


class StoreSource:
    """Rows of one bridge device, read incrementally from the sample store."""

    def __init__(self, spec: rowlib.RowSpec, reader: StoreReader) -> None:
        self.spec = spec
        self.reader = reader
        self.window = rowlib.RowWindow(spec)
        self.problem = ""

    def refresh(self) -> None:
        """Fold what the bridge appended since the last call into the window."""
        resets = self.window.record_resets
        try:
            for raw in self.reader.read_new():
                self.window.add(raw)
            self.problem = ""
            if self.window.record_resets > resets:
                log.warning("the device's record numbers went back (%d times): it restarted or "
                            "replays its records; repeated records count as new rows",
                            self.window.record_resets - resets)
        except StoreNotReady as exc:
            self.problem = str(exc)  # the runtime reports it (status and log)

    @property
    def samples_read(self) -> int:
        """Samples read from the store so far (grows while the bridge writes)."""
        return self.reader.samples_read

    def snapshot(self, trained_until: float) -> Snapshot:
        self.refresh()
        built = rowlib.build(self.spec, self.window)
        n_train = len(built.x_train)
        waiting = self.problem
        if not waiting and n_train < self.spec.min_rows:
            waiting = f"{n_train} of {self.spec.min_rows} training rows"
        new = int((built.t_train > trained_until).sum()) if math.isfinite(trained_until) else n_train
        return Snapshot(built.x_train, built.y_train, built.x_holdout, built.y_holdout,
                        rows=built.rows, rows_new=new, rows_needed=self.spec.min_rows,
                        newest_time=float(built.t_train[-1]) if n_train else -math.inf,
                        waiting=waiting)

    def statistics(self, snap: Snapshot, lineage: str) -> DataStats:
        spec = self.spec
        return _stats(lineage, *rowlib.statistics(spec.task, spec.feature_names, spec.target,
                                                  snap.x_train, snap.y_train))


class DatasetSource:
    """One unit of a data set: static, already scaled (the demo's direct path)."""

    def __init__(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                 y_test: np.ndarray, target_scale: float, task: str,
                 feature_names: tuple[str, ...] = (), target: str = "") -> None:
        self.data = LocalData(x_train, y_train, x_test, y_test, target_scale)
        self.task = task
        self.feature_names = feature_names
        self.target = target

    def snapshot(self, trained_until: float) -> Snapshot:
        d = self.data
        n = len(d.x_train)
        return Snapshot(d.x_train, d.y_train, d.x_test, d.y_test, rows=n + len(d.x_test),
                        rows_new=n if not math.isfinite(trained_until) else 0, rows_needed=1,
                        newest_time=0.0, waiting="" if n else "the data set gives this unit no training rows",
                        scaled_already=True, target_scale=d.target_scale)

    def statistics(self, snap: Snapshot, lineage: str) -> DataStats:
        names = self.feature_names or tuple(f"x{i}" for i in range(snap.x_train.shape[1]))
        return _stats(lineage, *rowlib.statistics(self.task, names, self.target or "y",
                                                  snap.x_train, snap.y_train))


def _stats(lineage: str, columns: tuple[str, ...], count: int, sums: np.ndarray,
           m2: np.ndarray) -> DataStats:
    return DataStats(lineage, columns, count, tuple(float(v) for v in sums),
                     tuple(float(v) for v in m2))


class ScalingError(Exception):
    """The model cannot be applied to these rows (no fleet scaler, wrong width)."""


def scaled(snap: Snapshot, spec: ModelSpec) -> LocalData:
    """The snapshot as the model ``spec`` takes it (see the module docstring)."""
    if snap.scaled_already:
        return LocalData(snap.x_train, snap.y_train, snap.x_holdout, snap.y_holdout,
                         snap.target_scale)
    n_in = int(spec.layer_sizes[0])
    if snap.x_train.shape[1] != n_in:
        raise ScalingError(f"the model takes {n_in} features, this gateway's task has "
                           f"{snap.x_train.shape[1]}")
    if not spec.has_scaler:
        raise ScalingError("the model carries no fleet scaler: set [model] scaling = "
                           "\"federated\" on the aggregator")
    mean = np.asarray(spec.feature_mean, np.float64)
    std = np.asarray(spec.feature_std, np.float64)
    if mean.shape != (n_in,) or std.shape != (n_in,) or not (std > 0).all():
        raise ScalingError(f"the model's fleet scaler does not fit {n_in} features")

    def fx(x: np.ndarray) -> np.ndarray:
        return ((np.asarray(x, np.float64) - mean) / std).astype(np.float32)

    def fy(y: np.ndarray | None) -> np.ndarray | None:
        if y is None:
            return None
        if spec.task == "regression":
            return ((np.asarray(y, np.float64) - spec.target_mean) / spec.target_std).astype(np.float32)
        return np.asarray(y, np.float64)  # class ids: judged by _known_classes, then int64

    x_train, y_train = fx(snap.x_train), fy(snap.y_train)
    x_test, y_test = fx(snap.x_holdout), fy(snap.y_holdout)
    if spec.task == "classification":
        x_train, y_train = _known_classes(x_train, y_train, int(spec.layer_sizes[-1]))
        x_test, y_test = _known_classes(x_test, y_test, int(spec.layer_sizes[-1]))
    scale = spec.target_std if spec.task == "regression" else 1.0
    return LocalData(x_train, y_train, x_test, y_test, float(scale))


def _known_classes(x: np.ndarray, y: np.ndarray | None, classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows whose class id the model has an output for (others cannot be learned); a value
    that is no whole number (e.g. a class signal averaged by resampling) is no class id."""
    if y is None:
        return x, y
    ok = (y >= 0) & (y < classes) & (y == np.floor(y))
    return x[ok], y[ok].astype(np.int64)
