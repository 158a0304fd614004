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


def load_wind(
    *, gateways: int | None = None, max_rows_per_unit: int | None = None, seed: int = 0
) -> FederatedDataset:
    """Load the wind farm as 4 units (one per turbine) or 8 (turbine x year)."""
    gateways = 4 if gateways is None else gateways
    if gateways not in (4, 8):
        raise DatasetError(
            "wind", "gateways", gateways, "must be 4 (one per turbine) or 8 (turbine x year)"
        )
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
    rng = np.random.default_rng(seed)
    raw: dict[str, RawUnit] = {}
    for k in TURBINES:
        t, v = times[k], values[k]
        plant_row = np.clip(np.searchsorted(plant_time, t), 0, plant_time.size - 1)
        if not np.array_equal(plant_time[plant_row], t):
            raise AssertionError("turbine and plant timestamps do not line up")
        availability_loss = plant[plant_row, 1] > 0
        curtailed = plant[plant_row, 2] > 0
        p, ws = v[:, 1], v[:, 2]
        with np.errstate(invalid="ignore"):
            stopped = (p <= 0) & (ws > CUT_IN_MS)
            underproducing = (fleet_median > 50) & (p < 0.5 * fleet_median)
        label = (stopped | (availability_loss & underproducing)).astype(np.int8)
        ambiguous = availability_loss | curtailed
        train_all, test_all = block_split(t - EPOCH, WEEK, period=5, embargo=EMBARGO)
        valid = _valid_rows(v)
        train = train_all & valid & (label == 0) & ~ambiguous
        test = test_all & valid
        x = scada_features(v)
        if gateways == 8:
            parts = [(f"{k}-2014", t < YEAR_2015), (f"{k}-2015", t >= YEAR_2015)]
        else:
            parts = [(k, np.ones(t.size, dtype=bool))]
        for unit, in_unit in parts:
            tr, te = _cap(train & in_unit, test & in_unit, max_rows_per_unit, rng)
            raw[unit] = split_unit(x, p, t.astype(np.float64), tr, te, label)
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
