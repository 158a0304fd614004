"""Any CSV file with a unit column, federated the same way as the bundled data sets.

``csv:PATH`` with ``unit_column`` (one gateway per distinct value; without it the rows are
cut into ``gateways`` contiguous parts, default one), ``target`` (required), ``features``
(default: every other column) and ``task`` (``regression`` or ``classification``; class
labels must be integers and are renumbered 0..k-1 in sorted order).

Rows are taken to be in time order within a unit (the order of the file). The split is by
blocks of consecutive rows: every 5th block goes to test, the block size being a tenth of
the unit's rows capped at 10, so that even a small unit gets test rows. Units with fewer
than :data:`MIN_ROWS` rows are dropped with a note; if none is left, loading fails.

Every problem is a :class:`~fedcore.datasets.base.DatasetError` naming the file, the
column (or row) and the value: a missing column, a non-numeric or non-finite value with its
row number (the header is row 1), a non-integer class label.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedcore.datasets.base import (
    DatasetError,
    FederatedDataset,
    RawUnit,
    assemble,
    block_split,
    split_unit,
    subsample,
)

MIN_ROWS = 10
TASKS = ("regression", "classification")


def _check_column(path: str, header: list[str], key: str, name: str) -> None:
    if name not in header:
        raise DatasetError(path, key, name, f"no such column; the header has {', '.join(header)}")


def _read(
    path: str, unit_column: str | None, columns: Sequence[str]
) -> tuple[list[str], np.ndarray, np.ndarray]:
    units: list[str] = []
    row_numbers: list[int] = []
    rows: list[list[float]] = []
    try:
        f = Path(path).open(newline="")
    except OSError as exc:
        raise DatasetError(path, "<file>", path, f"cannot read: {exc.strerror}") from exc
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise DatasetError(path, "<file>", path, "empty file (no header)")
        header = [h.strip() for h in header]
        if unit_column is not None:
            _check_column(path, header, "unit_column", unit_column)
        index = [header.index(c) for c in columns]
        unit_index = header.index(unit_column) if unit_column is not None else -1
        for row_number, row in enumerate(reader, start=2):
            if not row:
                continue  # blank line
            if len(row) != len(header):
                raise DatasetError(
                    path, f"row {row_number}", row, f"has {len(row)} fields, header has {len(header)}"
                )
            values: list[float] = []
            for column, i in zip(columns, index, strict=True):
                try:
                    value = float(row[i])
                except ValueError:
                    value = float("nan")
                if not np.isfinite(value):
                    raise DatasetError(
                        path, f"row {row_number}", row[i], f"column '{column}' is not a finite number"
                    )
                values.append(value)
            rows.append(values)
            row_numbers.append(row_number)
            units.append(row[unit_index].strip() if unit_index >= 0 else "")
    if not rows:
        raise DatasetError(path, "<file>", path, "no data rows")
    return units, np.array(rows, dtype=np.float64), np.array(row_numbers)


def load_csv(
    path: str,
    *,
    unit_column: str | None = None,
    target: str | None = None,
    features: Sequence[str] | None = None,
    task: str | None = None,
    gateways: int | None = None,
    max_rows_per_unit: int | None = None,
    seed: int = 0,
) -> FederatedDataset:
    task = task or "regression"
    if task not in TASKS:
        raise DatasetError(path, "task", task, f"must be one of {', '.join(TASKS)}")
    if not target:
        raise DatasetError(path, "target", target, "a CSV data set needs a target column")
    header = _header(path)
    _check_column(path, header, "target", target)
    if features is None:
        features = [h for h in header if h not in (target, unit_column)]
    for name in features:
        _check_column(path, header, "features", name)
    if target in features or (unit_column is not None and unit_column in features):
        raise DatasetError(path, "features", list(features), "must not include the target or unit column")
    if not features:
        raise DatasetError(path, "features", list(features), "no feature columns")
    unit_names, table, row_numbers = _read(path, unit_column, [*features, target])
    x, y = table[:, :-1], table[:, -1]
    num_classes = 0
    notes: list[str] = []
    if task == "classification":
        y, classes = _class_ids(path, target, y, row_numbers)
        num_classes = len(classes)
        notes.append(f"classes {', '.join(f'{c:g}' for c in classes)} -> 0..{num_classes - 1}")
    groups = _groups(unit_names, unit_column, gateways, len(y))
    rng = np.random.default_rng(seed)
    raw: dict[str, RawUnit] = {}
    dropped: list[str] = []
    for unit, rows in groups.items():
        if rows.size < MIN_ROWS:
            dropped.append(f"{unit} ({rows.size})")
            continue
        position = np.arange(rows.size, dtype=np.float64)
        train, test = block_split(position, max(1, min(10, rows.size // 10)), period=5)
        if max_rows_per_unit is not None:
            cap = max(2, max_rows_per_unit)
            train_cap = max(1, round(cap * train.sum() / rows.size))
            train = subsample(train, train_cap, rng)
            test = subsample(test, max(1, cap - train_cap), rng)
        raw[unit] = split_unit(x[rows], y[rows], position, train, test)
    if dropped:
        notes.append(f"dropped units with < {MIN_ROWS} rows: {', '.join(dropped)}")
    if not raw:
        raise DatasetError(
            path, "unit_column", unit_column, f"no unit has at least {MIN_ROWS} rows ({', '.join(dropped)})"
        )
    return assemble(
        f"csv:{path}", task, tuple(features), target, raw, num_classes=num_classes, notes=tuple(notes)
    )


def _header(path: str) -> list[str]:
    try:
        with Path(path).open(newline="") as f:
            header = next(csv.reader(f), None)
    except OSError as exc:
        raise DatasetError(path, "<file>", path, f"cannot read: {exc.strerror}") from exc
    if not header:
        raise DatasetError(path, "<file>", path, "empty file (no header)")
    return [h.strip() for h in header]


def _class_ids(
    path: str, target: str, y: np.ndarray, row_numbers: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    bad = np.flatnonzero(y != np.round(y))
    if bad.size:
        first = int(bad[0])
        raise DatasetError(
            path,
            f"row {int(row_numbers[first])}",
            float(y[first]),
            f"class label in '{target}' is not an integer",
        )
    classes, ids = np.unique(y, return_inverse=True)
    if classes.size < 2:
        raise DatasetError(path, "target", target, "a classification target needs >= 2 classes")
    return ids, classes


def _groups(
    unit_names: list[str], unit_column: str | None, gateways: int | None, n: int
) -> dict[str, np.ndarray]:
    """Row indices per unit, in file order; ``gateways`` keeps the largest units."""
    if unit_column is None:
        parts = np.array_split(np.arange(n), gateways or 1)
        return {f"part{i}": rows for i, rows in enumerate(parts)}
    members: dict[str, list[int]] = {}
    for row, unit in enumerate(unit_names):
        members.setdefault(unit, []).append(row)
    groups = {u: np.array(rows) for u, rows in members.items()}
    if gateways is not None:
        largest = sorted(groups, key=lambda u: (-groups[u].size, u))[:gateways]
        groups = {u: groups[u] for u in groups if u in largest}
    return groups
