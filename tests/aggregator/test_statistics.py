"""Pure tests of aggregator.statistics: the fleet scaler from the gateways' sums."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.statistics import MAX_COUNT, check_stats, expected_columns, fleet_scaler
from edge.rows import statistics
from fedcore.datasets.base import Scaler
from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import DataStats, ModelSpec

LINEAGE = "20250601T120000Z-9f3a"
REGRESSION = ModelSpec("mlp", (3, 8, 1), features=("temp", "pressure", "flow"), target="power")
CLASSIFIER = ModelSpec("mlp", (2, 4, 3), task="classification", features=("vib", "temp"),
                       target="state")
AUTOENCODER = ModelSpec("autoencoder", (3, 2, 3), task="anomaly", features=("a", "b", "c"))


def stats_of(rows: np.ndarray, spec: ModelSpec = REGRESSION, lineage: str = LINEAGE) -> DataStats:
    """A gateway's answer, computed as the gateways compute it (features, then target)."""
    data = np.asarray(rows, np.float64)
    x, y = (data[:, :-1], data[:, -1]) if spec.task == "regression" else (data, None)
    columns, count, sums, m2 = statistics(spec.task, spec.features, spec.target, x, y)
    assert columns == expected_columns(spec)
    return DataStats(lineage, columns, count, tuple(map(float, sums)), tuple(map(float, m2)))


def refusal(stats: DataStats, spec: ModelSpec = REGRESSION) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as caught:
        check_stats(spec, LINEAGE, stats)
    return caught.value


def plant_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    """Columns on the scales of plant signals: offsets far larger than the spread."""
    loc = np.array([60.0, 101_325.0, -3.0, 1_500.0])
    scale = np.array([5.0, 250.0, 0.01, 300.0])
    return rng.normal(loc, scale, size=(n, 4))


# ---- the pooled scaler -----------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 400),
       cuts=st.lists(st.floats(0.0, 1.0), min_size=0, max_size=6))
def test_pooled_scaler_equals_numpy_on_the_concatenated_rows(seed: int, n: int,
                                                              cuts: list[float]) -> None:
    rows = plant_rows(np.random.default_rng(seed), n)
    bounds = sorted({0, n, *(int(c * n) for c in cuts)})
    parts = [rows[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]
    answers = [stats_of(part) for part in parts]
    for answer in answers:
        check_stats(REGRESSION, LINEAGE, answer)  # honest sums always pass
    spec = fleet_scaler(REGRESSION, answers)
    np.testing.assert_allclose(spec.feature_mean, rows[:, :3].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(spec.feature_std, rows[:, :3].std(axis=0), rtol=1e-6)
    assert spec.target_mean == pytest.approx(rows[:, 3].mean(), rel=1e-12)
    assert spec.target_std == pytest.approx(rows[:, 3].std(), rel=1e-6)


def test_pooled_scaler_matches_the_local_scaler() -> None:
    rows = plant_rows(np.random.default_rng(7), 3000)
    spec = fleet_scaler(REGRESSION, [stats_of(rows[:100]), stats_of(rows[100:2500]),
                                     stats_of(rows[2500:])])
    local = Scaler.fit(rows[:, :3], rows[:, 3])
    np.testing.assert_allclose(spec.feature_mean, local.feature_mean, rtol=1e-12)
    np.testing.assert_allclose(spec.feature_std, local.feature_std, rtol=1e-6)
    assert spec.target_std == pytest.approx(local.target_std, rel=1e-6)


@pytest.mark.parametrize("value", [0.0, 0.1, 0.3, 7.77, 20.3, -40.25, 230.7, 1013.25, 101_325.0])
@pytest.mark.parametrize("counts", [(3,), (10, 7), (1000, 1), (100_000, 12_345)])
def test_a_constant_column_is_left_unscaled(value: float, counts: tuple[int, ...]) -> None:
    rng = np.random.default_rng(3)
    answers = []
    for count in counts:
        rows = plant_rows(rng, count)
        rows[:, 1] = value  # e.g. a setpoint that never moved
        rows[:, 3] = value  # and a target that did not either
        answers.append(stats_of(rows))
    spec = fleet_scaler(REGRESSION, answers)
    assert spec.feature_std[1] == 1.0
    assert spec.feature_mean[1] == pytest.approx(value, rel=1e-9, abs=1e-12)
    assert spec.target_std == 1.0
    assert spec.feature_std[0] != 1.0 and spec.feature_std[2] != 1.0  # the others are scaled


def test_no_rows_is_an_error() -> None:
    with pytest.raises(ValueError, match="no rows"):
        fleet_scaler(REGRESSION, [])


@pytest.mark.parametrize("spec", [CLASSIFIER, AUTOENCODER], ids=["classification", "autoencoder"])
def test_specs_without_a_regression_target_have_no_target_stats(spec: ModelSpec) -> None:
    assert expected_columns(spec) == spec.features
    rows = np.random.default_rng(1).normal(10.0, 2.0, size=(50, len(spec.features)))
    answer = stats_of(rows, spec)
    check_stats(spec, LINEAGE, answer)
    fitted = fleet_scaler(spec, [answer])
    assert (fitted.target_mean, fitted.target_std) == (0.0, 1.0)
    np.testing.assert_allclose(fitted.feature_mean, rows.mean(axis=0), rtol=1e-12)
    # a regression-shaped answer (one column too many) is refused
    wrong = stats_of(np.column_stack([rows, rows[:, 0]]), REGRESSION)
    wrong = DataStats(LINEAGE, (*spec.features, "extra"), wrong.count, wrong.sums, wrong.m2)
    assert refusal(wrong, spec).reason == "bad_columns"


def test_regression_columns_are_the_features_then_the_target() -> None:
    assert expected_columns(REGRESSION) == ("temp", "pressure", "flow", "power")


# ---- validation -------------------------------------------------------------------------------


def good() -> DataStats:
    return stats_of(plant_rows(np.random.default_rng(0), 20))


def test_a_good_answer_passes() -> None:
    check_stats(REGRESSION, LINEAGE, good())


def test_wrong_lineage_is_refused() -> None:
    g = good()
    stale = DataStats("20240101T000000Z-0000", g.columns, g.count, g.sums, g.m2)
    err = refusal(stale)
    assert err.reason == "wrong_lineage" and "20240101T000000Z-0000" in err.detail


@pytest.mark.parametrize("columns", [
    ("temp", "pressure", "flow"),  # no target
    ("pressure", "temp", "flow", "power"),  # another order
    ("temp", "pressure", "flow", "energy"),  # another target
])
def test_wrong_columns_are_refused(columns: tuple[str, ...]) -> None:
    g = good()
    n = len(columns)
    err = refusal(DataStats(LINEAGE, columns, g.count, g.sums[:n], g.m2[:n]))
    assert err.reason == "bad_columns"


@pytest.mark.parametrize("count", [0, -5, MAX_COUNT + 1])
def test_counts_out_of_range_are_refused(count: int) -> None:
    g = good()
    err = refusal(DataStats(LINEAGE, g.columns, count, g.sums, g.m2))
    assert err.reason == "bad_stats" and str(count) in err.detail


def test_the_largest_count_is_accepted() -> None:
    check_stats(REGRESSION, LINEAGE, DataStats(LINEAGE, good().columns, MAX_COUNT,
                                               (0.0,) * 4, (1.0,) * 4))


def test_sums_of_the_wrong_length_are_refused() -> None:
    g = good()
    assert refusal(DataStats(LINEAGE, g.columns, g.count, g.sums[:3], g.m2)).reason == "bad_stats"
    assert refusal(DataStats(LINEAGE, g.columns, g.count, g.sums, (*g.m2, 1.0))).reason == "bad_stats"


@pytest.mark.parametrize("where", ["sums", "m2"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_sums_are_refused(where: str, bad: float) -> None:
    g = good()
    sums, m2 = list(g.sums), list(g.m2)
    (sums if where == "sums" else m2)[1] = bad
    err = refusal(DataStats(LINEAGE, g.columns, g.count, tuple(sums), tuple(m2)))
    assert err.reason == "bad_stats" and "finite" in err.detail


def test_negative_sums_of_squares_are_refused_negative_sums_are_not() -> None:
    g = good()
    negative_q = DataStats(LINEAGE, g.columns, g.count, g.sums, (g.m2[0], -1.0, *g.m2[2:]))
    err = refusal(negative_q)
    assert err.reason == "bad_stats" and ">= 0" in err.detail
    # a column of negative values has a negative sum: that is fine
    check_stats(REGRESSION, LINEAGE, stats_of(-plant_rows(np.random.default_rng(1), 20)))


def test_a_small_spread_far_from_zero_keeps_its_scale() -> None:
    # pressure in Pa: level 101 325, spread 3, a million rows on two gateways; the raw
    # sum of squares (~1e16) has a rounding of ~2 per row, as large as the variance itself
    rng = np.random.default_rng(5)
    rows = rng.normal([20.0, 101_325.0, 0.0, 1_000.0], [1.0, 3.0, 1.0, 10.0], size=(1_000_000, 4))
    spec = fleet_scaler(REGRESSION, [stats_of(rows[:300_000]), stats_of(rows[300_000:])])
    assert spec.feature_std[1] == pytest.approx(rows[:, 1].std(), rel=1e-9)


def test_a_gateway_whose_mean_differs_adds_its_offset_to_the_spread() -> None:
    # two gateways each constant, at 0 and at 10: the fleet spread is 5, not 0
    spec = ModelSpec("mlp", (1, 1), task="classification", features=("x",))
    answers = [DataStats(LINEAGE, ("x",), 2, (0.0,), (0.0,)),
               DataStats(LINEAGE, ("x",), 2, (20.0,), (0.0,))]
    fitted = fleet_scaler(spec, answers)
    assert fitted.feature_mean == (5.0,) and fitted.feature_std == (5.0,)
