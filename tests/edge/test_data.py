"""Where a gateway's rows come from (edge.data): the store source's readiness and new rows,
and scaling with the fleet scaler a model's spec carries."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from edge import rows as rowlib
from edge.data import DatasetSource, ScalingError, Snapshot, StoreSource, scaled
from edge.store import StoreReader
from fedcore import samples
from fedcore.protocol.messages import ModelSpec
from fedcore.samples import Sample, SampleWriter


def task(**kw: object) -> rowlib.RowSpec:
    """A regression of y on a and b, no holdout unless asked."""
    args: dict[str, object] = {"task": "regression", "target": "y", "holdout_every": 0,
                               "features": (rowlib.parse_feature("a"), rowlib.parse_feature("b"))}
    return rowlib.RowSpec(**{**args, **kw})  # type: ignore[arg-type]


def bridge_writes(path: Path, first: int, count: int) -> None:
    """``count`` polls of a, b, y (bridge time = 1000 + poll), handed back as the bridge does."""
    writer = SampleWriter(path)
    batch = []
    for i in range(first, first + count):
        batch += [Sample("dev", "a", 1000.0 + i, float(i)), Sample("dev", "b", 1000.0 + i, 1.0),
                  Sample("dev", "y", 1000.0 + i, 2.0 * i)]
    writer.write(batch)
    samples.close_writer(writer.conn)


def source(path: Path, spec: rowlib.RowSpec) -> StoreSource:
    return StoreSource(spec, StoreReader(path, "dev", spec.signals))


def test_the_store_source_waits_with_a_reason_until_it_has_min_rows(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    src = source(store, task(min_rows=30))
    snap = src.snapshot(-math.inf)
    assert not snap.ready and str(store) in snap.waiting  # no store yet: why, not a failure
    bridge_writes(store, 0, 12)
    snap = src.snapshot(-math.inf)
    assert not snap.ready and snap.waiting == "12 of 30 training rows"
    assert (snap.rows, snap.rows_needed) == (12, 30)
    bridge_writes(store, 12, 18)
    snap = src.snapshot(-math.inf)
    assert snap.ready and snap.waiting == "" and len(snap.x_train) == 30
    np.testing.assert_array_equal(snap.x_train[:, 0], np.arange(30))
    np.testing.assert_array_equal(snap.y_train, 2.0 * np.arange(30))


def test_only_training_rows_count_towards_min_rows(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    bridge_writes(store, 0, 40)  # bridge time 1000..1039: blocks of 10 s, every 2nd held out
    snap = source(store, task(min_rows=30, holdout_every=2, holdout_block_s=10.0)).snapshot(-math.inf)
    assert snap.waiting == "20 of 30 training rows" and snap.rows == 40 and len(snap.x_holdout) == 20


def test_rows_new_counts_training_rows_younger_than_trained_until(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    bridge_writes(store, 0, 50)
    src = source(store, task(min_rows=10))
    snap = src.snapshot(-math.inf)
    assert snap.rows_new == 50 and snap.newest_time == 1049.0
    trained_until = snap.newest_time  # a round trained on these
    assert src.snapshot(trained_until).rows_new == 0
    bridge_writes(store, 50, 7)
    later = src.snapshot(trained_until)
    assert later.rows_new == 7 and later.rows == 57
    assert src.snapshot(1020.0).rows_new == 36  # rows of 1021..1056


def test_store_statistics_are_the_sums_of_the_training_rows(tmp_path: Path) -> None:
    store = tmp_path / "samples.db"
    bridge_writes(store, 0, 20)
    src = source(store, task(min_rows=1, valid=(("a", 0.0, 9.0),)))
    stats = src.statistics(src.snapshot(-math.inf), "L1")
    a = np.arange(10.0)
    assert stats.lineage == "L1" and stats.columns == ("a", "b", "y") and stats.count == 10
    np.testing.assert_allclose(stats.sums, [a.sum(), 10.0, (2 * a).sum()])
    # centred about the gateway's own mean: column b is constant, so its spread is 0
    np.testing.assert_allclose(stats.m2, [((a - 4.5) ** 2).sum(), 0.0, ((2 * a - 9) ** 2).sum()],
                               atol=1e-12)


# ---- scaling with the fleet scaler ------------------------------------------------------


def snap(x: list[list[float]], y: list[float] | None, xh: list[list[float]] | None = None,
         yh: list[float] | None = None) -> Snapshot:
    x_hold = np.asarray(xh if xh is not None else np.zeros((0, len(x[0]))), np.float64)
    return Snapshot(np.asarray(x, np.float64), None if y is None else np.asarray(y, np.float64),
                    x_hold, None if yh is None and y is None else np.asarray(yh or [], np.float64),
                    rows=len(x), rows_new=len(x), rows_needed=1, newest_time=0.0)


SPEC = ModelSpec("mlp", (2, 8, 1), task="regression", features=("a", "b"), target="y",
                 feature_mean=(10.0, -1.0), feature_std=(2.0, 0.5), target_mean=100.0, target_std=20.0)


def test_scaled_standardises_with_the_fleet_scaler() -> None:
    data = scaled(snap([[10.0, -1.0], [14.0, 0.0]], [100.0, 60.0], [[8.0, -2.0]], [140.0]), SPEC)
    np.testing.assert_allclose(data.x_train, [[0.0, 0.0], [2.0, 2.0]])
    np.testing.assert_allclose(data.y_train, [0.0, -2.0])
    np.testing.assert_allclose(data.x_test, [[-1.0, -2.0]])
    np.testing.assert_allclose(data.y_test, [2.0])
    assert data.target_scale == 20.0  # errors reported in the target's unit
    assert data.x_train.dtype == np.float32


def test_scaled_refuses_a_model_without_a_fleet_scaler() -> None:
    bare = ModelSpec("mlp", (2, 8, 1), features=("a", "b"), target="y")
    with pytest.raises(ScalingError, match="no fleet scaler"):
        scaled(snap([[1.0, 2.0]], [1.0]), bare)


@pytest.mark.parametrize("spec", [
    ModelSpec("mlp", (3, 8, 1), feature_mean=(0.0, 0.0, 0.0), feature_std=(1.0, 1.0, 1.0)),
    ModelSpec("mlp", (2, 8, 1), feature_mean=(0.0, 0.0, 0.0), feature_std=(1.0, 1.0, 1.0)),
    ModelSpec("mlp", (2, 8, 1), feature_mean=(0.0, 0.0), feature_std=(1.0, 0.0)),
], ids=["model-width", "scaler-width", "zero-std"])
def test_scaled_refuses_a_model_that_does_not_fit_the_rows(spec: ModelSpec) -> None:
    with pytest.raises(ScalingError):
        scaled(snap([[1.0, 2.0]], [1.0]), spec)


def test_classification_drops_rows_of_classes_the_model_has_no_output_for() -> None:
    spec = ModelSpec("mlp", (1, 4, 3), task="classification", features=("a",), target="k",
                     feature_mean=(0.0,), feature_std=(1.0,))
    x = [[float(i)] for i in range(8)]
    labels = [0.0, 1.0, 2.0, 3.0, -1.0, 1.5, -0.5, 2.0]
    data = scaled(snap(x, labels, x, labels), spec)
    assert data.x_train[:, 0].tolist() == [0.0, 1.0, 2.0, 7.0]
    assert data.y_train.tolist() == [0, 1, 2, 2] and data.y_train.dtype == np.int64
    assert data.y_test.tolist() == [0, 1, 2, 2]
    assert data.target_scale == 1.0


def test_anomaly_rows_have_no_target() -> None:
    spec = ModelSpec("autoencoder", (2, 1, 2), task="anomaly", features=("a", "b"),
                     feature_mean=(1.0, 1.0), feature_std=(1.0, 2.0))
    data = scaled(snap([[1.0, 3.0]], None), spec)
    np.testing.assert_allclose(data.x_train, [[0.0, 1.0]])
    assert data.y_train is None and data.y_test is None


def test_data_set_rows_are_used_as_the_data_set_scaled_them() -> None:
    x = np.array([[0.5, -0.5], [1.0, 0.0]], np.float32)
    y = np.array([0.1, 0.2], np.float32)
    src = DatasetSource(x, y, x[:1], y[:1], 30.0, "regression", ("a", "b"), "y")
    first = src.snapshot(-math.inf)
    assert first.ready and first.rows == 3 and first.rows_new == 2
    assert src.snapshot(0.0).rows_new == 0  # static: nothing new after a round
    data = scaled(first, ModelSpec("mlp", (2, 1)))  # no scaler needed
    assert data.x_train is x and data.target_scale == 30.0
    stats = src.statistics(first, "L")
    assert stats.columns == ("a", "b", "y") and stats.count == 2
    np.testing.assert_allclose(stats.sums, [1.5, -0.5, 0.3], rtol=1e-6)


def test_a_data_set_unit_without_training_rows_waits() -> None:
    empty = np.zeros((0, 2), np.float32)
    src = DatasetSource(empty, np.zeros(0, np.float32), empty, np.zeros(0, np.float32), 1.0,
                        "regression")
    assert "no training rows" in src.snapshot(-math.inf).waiting
