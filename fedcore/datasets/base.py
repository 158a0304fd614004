"""The federated data set type shared by every loader, its scaler and its splitting rules.

Theory of operation
-------------------
A :class:`FederatedDataset` is a set of *units* (one gateway each: a turbine, a battery
cell, a CSV unit) with a training and a held-out test split per unit. Rows are float32 and
already scaled; the :class:`Scaler` that did it travels with the data set so an edge can
scale live readings the same way and reports can give errors in the target's own unit.

Splitting is by blocks of time, never by random rows: neighbouring 10-minute SCADA rows or
consecutive battery cycles are near copies of each other, so a random split would let a model
score well by remembering its neighbours. :func:`block_split` sends every ``period``-th
block to test and can leave an embargo gap of training rows on either side of a test block.
Every split is a partition of the unit's rows (no row is in both), which tests check.

The scaler is fitted on the union of the training rows of all units, never on test rows. In
a deployment the same mean and variance come from one federated statistics round (each
gateway sends its count, sum and centred sum of squares), so no raw rows move.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

from fedcore.errors import ConfigError
from fedcore.learning.metrics import headline_metric


class DatasetError(ConfigError, ValueError):
    """A data set cannot be built as asked: names the file, the column or key, and the value."""


def _frozen(a: np.ndarray, dtype: type = np.float32) -> np.ndarray:
    out: np.ndarray = np.array(a, dtype=dtype)  # a private copy, so nobody else can mutate it
    out.setflags(write=False)
    return out


@dataclass(frozen=True, eq=False)
class Scaler:
    """Standardises features (and, for regression, the target) with training statistics."""

    feature_mean: np.ndarray
    feature_std: np.ndarray
    target_mean: float = 0.0
    target_std: float = 1.0

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray | None) -> Scaler:
        """Fit on training rows. ``y=None``: leave the target as is (class ids)."""
        x64 = np.asarray(x, dtype=np.float64)
        std = x64.std(axis=0)
        # A constant feature would divide by zero; leaving it unscaled keeps it constant.
        std = np.where(std > 1e-12, std, 1.0)
        if y is None:
            return cls(_frozen(x64.mean(axis=0), np.float64), _frozen(std, np.float64))
        y64 = np.asarray(y, dtype=np.float64)
        y_std = float(y64.std()) if float(y64.std()) > 1e-12 else 1.0
        return cls(
            _frozen(x64.mean(axis=0), np.float64), _frozen(std, np.float64), float(y64.mean()), y_std
        )

    def transform(self, raw: np.ndarray) -> np.ndarray:
        """Scale raw feature rows ``(n, n_features)`` (columns in ``dataset.features`` order)."""
        raw = np.asarray(raw, dtype=np.float64)
        if raw.ndim != 2 or raw.shape[1] != self.feature_mean.shape[0]:
            raise ValueError(
                f"raw features of shape {raw.shape}, expected (n, {self.feature_mean.shape[0]})"
            )
        return ((raw - self.feature_mean) / self.feature_std).astype(np.float32)

    def transform_target(self, y: np.ndarray) -> np.ndarray:
        return ((np.asarray(y, np.float64) - self.target_mean) / self.target_std).astype(np.float32)

    def inverse_target(self, y_scaled: np.ndarray) -> np.ndarray:
        """Model outputs back to the target's own unit (e.g. kW)."""
        return np.asarray(y_scaled, np.float64) * self.target_std + self.target_mean


@dataclass(frozen=True, eq=False)
class UnitData:
    """One unit's rows. ``t_*`` order the rows in time (unix s, cycle number or row number);
    ``test_labels`` (0/1 per test row) marks known anomalies where the data set has them."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    t_train: np.ndarray
    t_test: np.ndarray
    test_labels: np.ndarray | None = None

    @property
    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.x_test.shape[0])


@dataclass(frozen=True, eq=False)
class FederatedDataset:
    name: str
    task: str  # "regression" | "classification"
    features: tuple[str, ...]
    target: str
    units: Mapping[str, UnitData]
    scaler: Scaler
    target_unit: str = ""  # unit of the target on its original scale, e.g. "kW"
    num_classes: int = 0  # classification only
    notes: tuple[str, ...] = field(default=())  # what the loader dropped and why

    @property
    def unit_names(self) -> tuple[str, ...]:
        return tuple(self.units)

    @property
    def x_test(self) -> np.ndarray:
        """Every unit's test rows, pooled in unit order."""
        return np.concatenate([u.x_test for u in self.units.values()])

    @property
    def y_test(self) -> np.ndarray:
        return np.concatenate([u.y_test for u in self.units.values()])

    @property
    def test_labels(self) -> np.ndarray | None:
        labels = [u.test_labels for u in self.units.values()]
        if any(lab is None for lab in labels):
            return None
        return np.concatenate([lab for lab in labels if lab is not None])

    @property
    def is_binary(self) -> bool:
        return self.task == "classification" and self.num_classes == 2

    @property
    def train_positive_rate(self) -> float | None:
        """Share of training rows of class 1 in a binary classification, else None."""
        if not self.is_binary:
            return None
        y = np.concatenate([u.y_train for u in self.units.values()])
        return float(np.mean(y == 1)) if y.size else None

    @property
    def primary_metric(self) -> tuple[str, bool]:
        """(metric name, higher is better); regression errors are on the original scale.
        A binary task with a rare positive class is ranked by the positive class's F1:
        its accuracy is high whatever the model does."""
        return headline_metric(self.task, self.num_classes, self.train_positive_rate)


class RawUnit(NamedTuple):
    """One unit's unscaled split, before the scaler is fitted."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    t_train: np.ndarray
    t_test: np.ndarray
    test_labels: np.ndarray | None


def split_unit(
    x_raw: np.ndarray,
    y: np.ndarray,
    t: np.ndarray,
    train_mask: np.ndarray,
    test_mask: np.ndarray,
    labels: np.ndarray | None = None,
) -> RawUnit:
    """Select one unit's raw train and test rows (scaling happens once the scaler is fitted)."""
    if np.any(test_mask & train_mask):
        raise AssertionError("a row is in both the training and the test split")
    return RawUnit(
        x_raw[train_mask],
        y[train_mask],
        x_raw[test_mask],
        y[test_mask],
        t[train_mask],
        t[test_mask],
        None if labels is None else labels[test_mask],
    )


def block_split(
    keys: np.ndarray, block: float, period: int = 5, embargo: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(train_mask, test_mask): block ``floor(key / block)``; every ``period``-th goes to test.

    Training rows closer than ``embargo`` (in key units) to a test block are dropped, so
    rows that are near copies of test rows do not leak the test block into training.
    """
    index = np.floor(np.asarray(keys, np.float64) / block).astype(np.int64)
    test = index % period == period - 1
    train = ~test
    if embargo > 0:
        offset = np.asarray(keys, np.float64) - index * block
        after_test = (index % period == 0) & (offset < embargo)
        before_test = (index % period == period - 2) & (offset >= block - embargo)
        train &= ~(after_test | before_test)
    return train, test


def subsample(mask: np.ndarray, cap: int | None, rng: np.random.Generator) -> np.ndarray:
    """Keep at most ``cap`` of the rows in ``mask``, chosen at random, in their order."""
    rows = np.flatnonzero(mask)
    if cap is None or rows.size <= cap:
        return mask
    keep = np.sort(rng.choice(rows, size=cap, replace=False))
    out = np.zeros_like(mask)
    out[keep] = True
    return out


def assemble(
    name: str,
    task: str,
    features: tuple[str, ...],
    target: str,
    raw_units: Mapping[str, RawUnit],
    *,
    target_unit: str = "",
    num_classes: int = 0,
    notes: tuple[str, ...] = (),
) -> FederatedDataset:
    """Fit the scaler on all training rows and build the frozen data set."""
    if not raw_units:
        raise ValueError(f"data set {name!r} has no unit with enough data")
    x_all = np.concatenate([u[0] for u in raw_units.values()])
    y_all = np.concatenate([u[1] for u in raw_units.values()])
    scaler = Scaler.fit(x_all, y_all if task == "regression" else None)
    units: dict[str, UnitData] = {}
    for unit, (x_tr, y_tr, x_te, y_te, t_tr, t_te, labels) in raw_units.items():
        if task == "regression":
            y_tr_s, y_te_s = scaler.transform_target(y_tr), scaler.transform_target(y_te)
        else:
            y_tr_s, y_te_s = _frozen(y_tr, np.int64), _frozen(y_te, np.int64)
        units[unit] = UnitData(
            x_train=_frozen(scaler.transform(x_tr)),
            y_train=_frozen(y_tr_s, y_tr_s.dtype.type),
            x_test=_frozen(scaler.transform(x_te)),
            y_test=_frozen(y_te_s, y_te_s.dtype.type),
            t_train=_frozen(t_tr, np.float64),
            t_test=_frozen(t_te, np.float64),
            test_labels=None if labels is None else _frozen(labels, np.int8),
        )
    return FederatedDataset(
        name=name,
        task=task,
        features=features,
        target=target,
        units=MappingProxyType(units),
        scaler=scaler,
        target_unit=target_unit,
        num_classes=num_classes,
        notes=notes,
    )
