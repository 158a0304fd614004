"""La Haute Borne wind farm (ENGIE, 4 Senvion MM82 turbines, 10-minute SCADA, 2014-2015).

Task: a *normal-behaviour model* of each turbine's active power ``P_avg`` (kW) from the
weather it sees. A turbine that produces far less than its model predicts is suspect, so
the absolute residual is an anomaly score.

Features (raw, before scaling): nacelle wind speed ``Ws_avg`` (m/s), the sine and cosine
of the absolute wind direction ``Wa_avg`` (a direction is circular: 359 and 1 degrees are
neighbours), outdoor temperature ``Ot_avg`` (air density) and the vane angle ``Va_avg``
(yaw misalignment, which costs power). Blade pitch ``Ba_avg`` is deliberately *not* a
feature: it is a controller output that goes to about 90 degrees (feathered) whenever a
turbine stops, so a model fed pitch would learn to predict zero power for a stopped
turbine and hide exactly the faults the residual should reveal.

Cleaning: rows with NaN, the outdoor-temperature sensor glitch (-273.2 degC) or physically
impossible values are dropped.

Anomaly labels (test rows, for ROC AUC only): the turbine is stopped (``P_avg <= 0``) while
the wind is above cut-in (4 m/s); or the plant's availability loss is positive at that
timestamp *and* this turbine produces under half the fleet's median power (the plant
figure does not say which turbine lost energy; attributing it to the under-producing
turbines avoids labelling healthy neighbours). Training uses normal rows only: labelled
rows and every timestamp with plant availability loss or curtailment are left out.

Split: weeks counted from 2014-01-01 00:00 UTC; every 5th week goes to test, and one day of
training rows on either side of a test week is dropped (embargo).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
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

DATA_FILE = Path(__file__).parent / "data" / "la_haute_borne.npz"
TURBINES = ("R80711", "R80721", "R80736", "R80790")
SCADA_COLUMNS = ("Ba_avg", "P_avg", "Ws_avg", "Va_avg", "Ot_avg", "Ya_avg", "Wa_avg")
FEATURES = ("Ws_avg", "Wa_sin", "Wa_cos", "Ot_avg", "Va_avg")
TARGET = "P_avg"
EPOCH = 1388534400  # 2014-01-01 00:00 UTC: week blocks are counted from here
YEAR_2015 = 1420070400  # 2015-01-01 00:00 UTC
WEEK = 7 * 86400
EMBARGO = 86400
CUT_IN_MS = 4.0
RATED_KW = 2050.0


def scada_features(values: np.ndarray) -> np.ndarray:
    """Raw feature matrix (``FEATURES`` order) from SCADA rows (``SCADA_COLUMNS`` order).

    The edge uses this on live readings before ``dataset.scaler.transform``.
    """
    v = np.asarray(values, dtype=np.float64)
    col = {name: v[:, i] for i, name in enumerate(SCADA_COLUMNS)}
    direction = np.deg2rad(col["Wa_avg"])
    return np.stack(
        [col["Ws_avg"], np.sin(direction), np.cos(direction), col["Ot_avg"], col["Va_avg"]],
        axis=1,
    )


def _valid_rows(v: np.ndarray) -> np.ndarray:
    col = {name: v[:, i] for i, name in enumerate(SCADA_COLUMNS)}
    used = [SCADA_COLUMNS.index(c) for c in ("P_avg", "Ws_avg", "Va_avg", "Ot_avg", "Wa_avg")]
    ok = ~np.isnan(v[:, used]).any(axis=1)
    with np.errstate(invalid="ignore"):
        ok &= (col["Ot_avg"] > -40) & (col["Ot_avg"] < 50)  # -273.2 is a sensor glitch
        ok &= (col["Ws_avg"] >= 0) & (col["Ws_avg"] < 40)
        ok &= (col["P_avg"] > -100) & (col["P_avg"] < 1.1 * RATED_KW)
        ok &= np.abs(col["Va_avg"]) <= 180
    return ok


@dataclass(frozen=True, eq=False)
class PlantContext:
    """Plant-level facts for each row of one turbine, which its own registers do not carry:
    the plant reported availability loss or curtailment at that time, and the fleet's
    median power (to tell which turbine lost the energy)."""

    availability_loss: np.ndarray  # bool (n,)
    curtailed: np.ndarray  # bool (n,)
    fleet_median: np.ndarray  # float64 (n,) kW, NaN where no turbine reported

    def rows(self, index: np.ndarray | slice) -> PlantContext:
        return PlantContext(
            self.availability_loss[index], self.curtailed[index], self.fleet_median[index]
        )


def wind_masks(
    time: np.ndarray, values: np.ndarray, context: PlantContext | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, test, label) masks over one turbine's raw rows (``SCADA_COLUMNS`` order).

    With ``context=None`` (a gateway that sees only its own turbine) the only anomaly label
    is the turbine's own "stopped in wind" rule and no row counts as ambiguous; the test
    split does not depend on the context at all."""
    t = np.asarray(time)
    v = np.asarray(values, dtype=np.float64)
    p, ws = v[:, 1], v[:, 2]
    with np.errstate(invalid="ignore"):
        stopped = (p <= 0) & (ws > CUT_IN_MS)
        if context is None:
            label = stopped.astype(np.int8)
            ambiguous = np.zeros(t.size, dtype=bool)
        else:
            median = context.fleet_median
            underproducing = (median > 50) & (p < 0.5 * median)
            label = (stopped | (context.availability_loss & underproducing)).astype(np.int8)
            ambiguous = context.availability_loss | context.curtailed
    train_all, test_all = block_split(t - EPOCH, WEEK, period=5, embargo=EMBARGO)
    valid = _valid_rows(v)
    train = train_all & valid & (label == 0) & ~ambiguous
    return train, test_all & valid, label


def wind_unit_from_rows(
    time: np.ndarray, values: np.ndarray, context: PlantContext | None = None
) -> RawUnit:
    """One turbine's raw (unscaled) split from its SCADA rows, as :func:`load_wind` makes it.

    ``time`` is Unix seconds, ``values`` ``(n, 7)`` in ``SCADA_COLUMNS`` order (what
    ``edge.store.wind_rows`` returns). Scale with the fleet's scaler afterwards."""
    v = np.asarray(values, dtype=np.float64)
    train, test, label = wind_masks(time, v, context)
    t = np.asarray(time).astype(np.float64)
    return split_unit(scada_features(v), v[:, 1], t, train, test, label)


def _read() -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, PlantContext]]:
    """Each turbine's times, raw values and plant context, from the packaged file."""
    with np.load(DATA_FILE) as npz:
        plant_time = npz["plant_time"]
        plant = npz["plant_values"].astype(np.float64)
        times = {k: npz[f"{k}_time"] for k in TURBINES}
        values = {k: npz[f"{k}_values"].astype(np.float64) for k in TURBINES}
    # Turbine rows repeat a timestamp at the autumn clock change; map each to its plant row.
    power = np.stack([values[k][:, 1] for k in TURBINES])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN timestamp gives NaN
        fleet_median = np.nanmedian(power, axis=0)
    contexts: dict[str, PlantContext] = {}
    for k in TURBINES:
        t = times[k]
        plant_row = np.clip(np.searchsorted(plant_time, t), 0, plant_time.size - 1)
        if not np.array_equal(plant_time[plant_row], t):
            raise AssertionError("turbine and plant timestamps do not line up")
        contexts[k] = PlantContext(plant[plant_row, 1] > 0, plant[plant_row, 2] > 0, fleet_median)
    return times, values, contexts


def load_wind(
    *, gateways: int | None = None, max_rows_per_unit: int | None = None, seed: int = 0
) -> FederatedDataset:
    """Load the wind farm as 4 units (one per turbine) or 8 (turbine x year)."""
    gateways = 4 if gateways is None else gateways
    if gateways not in (4, 8):
        raise DatasetError(
            "wind", "gateways", gateways, "must be 4 (one per turbine) or 8 (turbine x year)"
        )
    times, values, contexts = _read()
    rng = np.random.default_rng(seed)
    raw: dict[str, RawUnit] = {}
    for k in TURBINES:
        t, v = times[k], values[k]
        train, test, label = wind_masks(t, v, contexts[k])
        p = v[:, 1]
        x = scada_features(v)
        if gateways == 8:
            parts = [(f"{k}-2014", t < YEAR_2015), (f"{k}-2015", t >= YEAR_2015)]
        else:
            parts = [(k, np.ones(t.size, dtype=bool))]
        for unit, in_unit in parts:
            tr, te = _cap(train & in_unit, test & in_unit, max_rows_per_unit, rng)
            raw[unit] = split_unit(x, p, t.astype(np.float64), tr, te, label)
    return _assemble(raw)


def load_wind_rows(
    first_row: int, num_rows: int, *, plant_context: bool = True
) -> FederatedDataset:
    """The 4 turbines restricted to rows ``[first_row, first_row + num_rows)`` of each series
    (the record numbers the simulated turbines serve), with the same cleaning, split and
    labels as :func:`load_wind` and a scaler fitted on these rows' training split.

    ``plant_context=False`` applies only the rules a gateway can apply from its own turbine
    (see :func:`wind_masks`)."""
    if first_row < 0 or num_rows < 1:
        raise DatasetError("wind", "rows", (first_row, num_rows), "need first_row >= 0, num_rows >= 1")
    times, values, contexts = _read()
    rows = slice(first_row, first_row + num_rows)
    if first_row + num_rows > min(t.size for t in times.values()):
        raise DatasetError("wind", "rows", (first_row, num_rows), "past the end of the series")
    raw = {
        k: wind_unit_from_rows(
            times[k][rows], values[k][rows], contexts[k].rows(rows) if plant_context else None
        )
        for k in TURBINES
    }
    return _assemble(raw)


def _assemble(raw: dict[str, RawUnit]) -> FederatedDataset:
    return assemble(
        "wind",
        "regression",
        FEATURES,
        TARGET,
        raw,
        target_unit="kW",
        notes=("pitch (Ba_avg) is not a feature: it reveals a stopped turbine",),
    )


def _cap(
    train: np.ndarray, test: np.ndarray, cap: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Subsample to ``cap`` rows in all, keeping the unit's train/test proportion."""
    if cap is None:
        return train, test
    if cap < 5:
        raise DatasetError("wind", "max_rows_per_unit", cap, "must be >= 5")
    n_train, n_test = int(train.sum()), int(test.sum())
    train_cap = max(1, round(cap * n_train / max(1, n_train + n_test)))
    return subsample(train, train_cap, rng), subsample(test, max(1, cap - train_cap), rng)
