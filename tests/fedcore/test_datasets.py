"""Data sets: partition by natural unit, time-respecting leak-free splits, scaling, CSV errors."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from fedcore.datasets import (
    DatasetError,
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.datasets.wind import EMBARGO, EPOCH, TURBINES, WEEK
from fedcore.errors import ConfigError
from fedcore.learning.models import init_params
from fedcore.learning.training import train_local


@pytest.fixture(scope="module")
def wind():
    return load_dataset("wind")


@pytest.fixture(scope="module")
def batteries():
    return load_dataset("batteries")


def _raw(ds, x):
    return x.astype(np.float64) * ds.scaler.feature_std + ds.scaler.feature_mean


def test_wind_units_are_turbines_with_float32_rows(wind):
    assert wind.unit_names == TURBINES
    assert wind.task == "regression" and wind.target == "P_avg" and wind.target_unit == "kW"
    assert wind.features == ("Ws_avg", "Wa_sin", "Wa_cos", "Ot_avg", "Va_avg")
    assert "Ba_avg" not in wind.features
    for unit in wind.units.values():
        assert unit.x_train.dtype == np.float32 and unit.y_train.dtype == np.float32
        assert unit.x_train.shape == (unit.num_train, 5) and unit.y_train.shape == (unit.num_train,)
        assert unit.x_test.shape == (unit.num_test, 5) and unit.test_labels.shape == (unit.num_test,)
        assert unit.num_train > 50_000 and unit.num_test > 10_000
        assert 0 < unit.test_labels.sum() < 0.05 * unit.num_test
        assert not unit.x_train.flags.writeable
    assert wind.x_test.shape[0] == sum(u.num_test for u in wind.units.values())
    assert wind.test_labels.shape[0] == wind.x_test.shape[0]
    assert wind.primary_metric == ("rmse", False)


def test_wind_split_is_by_week_with_embargo_and_no_overlap(wind):
    for unit in wind.units.values():
        assert not set(unit.t_train.tolist()) & set(unit.t_test.tolist())
        test_week = (unit.t_test - EPOCH) // WEEK
        assert np.all(test_week % 5 == 4)
        train_week = (unit.t_train - EPOCH) // WEEK
        assert not np.any(train_week % 5 == 4)
        # Every training row is at least a day away from any test week.
        offset = (unit.t_train - EPOCH) % WEEK
        assert not np.any((train_week % 5 == 0) & (offset < EMBARGO))
        assert not np.any((train_week % 5 == 3) & (offset >= WEEK - EMBARGO))
        assert np.all(np.diff(unit.t_train) >= 0)


def test_wind_training_rows_are_clean_and_normal(wind):
    for unit in wind.units.values():
        raw = _raw(wind, unit.x_train)
        power = wind.scaler.inverse_target(unit.y_train)
        assert raw[:, 3].min() > -40  # the -273.2 degC glitch is gone
        # (tolerances: the rows went through float32 scaling and back)
        assert not np.any((power <= -0.01) & (raw[:, 0] > 4.01))  # no stopped-in-wind rows
        raw_test = _raw(wind, unit.x_test)
        test_power = wind.scaler.inverse_target(unit.y_test)
        stopped = (test_power <= -0.01) & (raw_test[:, 0] > 4.01)
        assert stopped.any() and np.all(unit.test_labels[stopped] == 1)
        assert np.allclose(raw_test[:, 1] ** 2 + raw_test[:, 2] ** 2, 1.0, atol=1e-4)


def test_scaler_is_fitted_on_pooled_training_rows_only(wind, batteries):
    for ds in (wind, batteries):
        x = np.concatenate([u.x_train for u in ds.units.values()]).astype(np.float64)
        y = np.concatenate([u.y_train for u in ds.units.values()]).astype(np.float64)
        np.testing.assert_allclose(x.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(x.std(axis=0), 1, atol=1e-4)
        assert abs(y.mean()) < 1e-4 and abs(y.std() - 1) < 1e-4
        # The test rows were not part of the fit: their statistics differ.
        assert abs(ds.y_test.astype(np.float64).mean()) > 1e-3
    raw = np.array([[10.0, 0.0, 1.0, 15.0, 0.0]])
    scaled = wind.scaler.transform(raw)
    np.testing.assert_allclose(_raw(wind, scaled), raw, atol=1e-4)
    assert wind.scaler.inverse_target(wind.scaler.transform_target(np.array([1500.0])))[0] == pytest.approx(1500.0)


def test_wind_eight_gateways_and_deterministic_subsampling():
    ds = load_dataset("wind", gateways=8, max_rows_per_unit=400, seed=3)
    assert len(ds.units) == 8 and "R80711-2015" in ds.units
    for name, unit in ds.units.items():
        assert unit.num_train + unit.num_test <= 400 and unit.num_test > 0
        year_start = 1388534400 if name.endswith("2014") else 1420070400
        assert np.all((unit.t_train >= year_start) & (unit.t_train < year_start + 366 * 86400))
    again = load_dataset("wind", gateways=8, max_rows_per_unit=400, seed=3)
    other = load_dataset("wind", gateways=8, max_rows_per_unit=400, seed=4)
    u = "R80736-2014"
    assert np.array_equal(ds.units[u].t_train, again.units[u].t_train)
    assert not np.array_equal(ds.units[u].t_train, other.units[u].t_train)
    with pytest.raises(DatasetError, match="gateways"):
        load_dataset("wind", gateways=3)


def test_batteries_one_unit_per_cell_split_by_cycle_blocks(batteries):
    assert "capacity" not in batteries.features and batteries.target == "soh"
    assert "B0005" in batteries.units and "B0034" not in batteries.units  # 1 cycle: dropped
    assert len(batteries.units) == 21
    assert "B0034 (1)" in batteries.notes[0]
    for unit in batteries.units.values():
        assert not set(unit.t_train.tolist()) & set(unit.t_test.tolist())
        assert np.all(((unit.t_test - 1) // 4) % 5 == 4)  # cycles 17-20, 37-40, ...
        assert unit.test_labels is None
    soh = batteries.scaler.inverse_target(batteries.units["B0005"].y_train)
    assert soh[0] == pytest.approx(1.0, abs=1e-5) and 0.6 < soh.min() < 0.75  # cycle 1 is 100%
    five = load_dataset("batteries", gateways=5)
    assert set(five.units) == {"B0005", "B0006", "B0007", "B0018", "B0042"}
    rul = load_dataset("batteries", target="rul")
    assert rul.target == "rul" and rul.target_unit == "cycles"
    with pytest.raises(DatasetError, match="target"):
        load_dataset("batteries", target="capacity")


def test_synthetic_blobs_with_label_skew():
    ds = load_dataset("synthetic", gateways=6, seed=1)
    assert ds.task == "classification" and ds.num_classes == 4 and len(ds.units) == 6
    for unit in ds.units.values():
        assert unit.x_train.shape == (1600, 24) and unit.x_test.shape == (400, 24)
        assert unit.y_train.dtype == np.int64
    shares = [np.bincount(u.y_train, minlength=4) / 1600 for u in ds.units.values()]
    assert max(s.max() for s in shares) > 0.5  # Dirichlet(0.5) skew
    assert ds.primary_metric == ("accuracy", True)
    same = load_dataset("synthetic", gateways=6, seed=1)
    other = load_dataset("synthetic", gateways=6, seed=2)
    assert np.array_equal(same.units["gw0"].x_train, ds.units["gw0"].x_train)
    assert not np.array_equal(other.units["gw0"].x_train, ds.units["gw0"].x_train)


def _write_csv(tmp_path, rows, header="site,a,b,y"):
    path = tmp_path / "data.csv"
    path.write_text(header + "\n" + "\n".join(rows) + "\n")
    return f"csv:{path}"


def test_csv_happy_path_partitions_by_unit(tmp_path):
    rows = [f"s{i % 3},{i},{i * 0.5},{2 * i + 1}" for i in range(90)] + ["tiny,1,2,3"]
    name = _write_csv(tmp_path, rows)
    ds = load_dataset(name, unit_column="site", target="y")
    assert set(ds.units) == {"s0", "s1", "s2"} and ds.features == ("a", "b")
    assert any("tiny (1)" in n for n in ds.notes)
    for unit in ds.units.values():
        assert unit.num_train + unit.num_test == 30 and unit.num_test > 0
        assert not set(unit.t_train.tolist()) & set(unit.t_test.tolist())
    # Only training rows went into the scaler.
    train_a = np.concatenate([_raw(ds, u.x_train)[:, 0] for u in ds.units.values()])
    assert ds.scaler.feature_mean[0] == pytest.approx(train_a.mean())
    only_a = load_dataset(name, unit_column="site", target="y", features=["a"], gateways=2)
    assert only_a.features == ("a",) and len(only_a.units) == 2


def test_csv_classification_renumbers_labels(tmp_path):
    rows = [f"u,{i},{i % 7},{(i % 3) * 10}" for i in range(40)]
    ds = load_dataset(
        _write_csv(tmp_path, rows), target="y", features=["a", "b"], task="classification"
    )
    assert ds.num_classes == 3 and set(np.unique(ds.units["part0"].y_train)) == {0, 1, 2}
    rows[5] = "u,5,5,2.5"
    with pytest.raises(DatasetError, match="row 7.*not an integer"):
        load_dataset(
            _write_csv(tmp_path, rows), target="y", features=["a", "b"], task="classification"
        )


SITE_Y = {"unit_column": "site", "target": "y"}


@pytest.mark.parametrize(
    "kwargs,rows,match",
    [
        ({"unit_column": "site", "target": "power"}, None, "'target' = 'power': no such column"),
        ({"unit_column": "plant", "target": "y"}, None, "'unit_column' = 'plant': no such column"),
        ({"target": "y", "features": ["a", "c"]}, None, "'features' = 'c': no such column"),
        ({"unit_column": "site"}, None, "needs a target column"),
        ({"target": "y", "task": "ranking"}, None, "task"),
        (SITE_Y, ["x,1,2,3", "x,1,oops,3"], "row 3.*column 'b' is not a finite number"),
        (SITE_Y, ["x,1,2,3", "x,1,nan,3"], "row 3.*column 'b'"),
        ({"target": "y"}, ["x,1,2,3"], "row 2.*column 'site' is not a finite number"),
        ({"target": "y"}, ["x,1,2"], "row 2.*3 fields"),
        ({"unit_column": "site", "target": "y"}, ["x,1,2,3"] * 5, "no unit has at least 10 rows"),
    ],
)
def test_csv_errors_name_the_column_or_row(tmp_path, kwargs, rows, match):
    rows = rows if rows is not None else [f"s,{i},{i},{i}" for i in range(20)]
    with pytest.raises(DatasetError, match=match) as info:
        load_dataset(_write_csv(tmp_path, rows), **kwargs)
    assert isinstance(info.value, ConfigError) and isinstance(info.value, ValueError)


def test_unknown_names_and_misplaced_options_are_refused(tmp_path):
    with pytest.raises(DatasetError, match="must be one of"):
        load_dataset("solar")
    with pytest.raises(DatasetError, match="only a csv"):
        load_dataset("wind", unit_column="turbine")
    with pytest.raises(DatasetError, match="cannot read"):
        load_dataset(f"csv:{tmp_path / 'missing.csv'}", target="y")


def test_default_model_trains_on_wind_and_reports_kw():
    ds = load_dataset("wind", max_rows_per_unit=3000)
    spec = default_spec(ds)
    assert spec.layer_sizes[0] == 5 and spec.features == ds.features and spec.target == "P_avg"
    params = init_params(spec, np.random.default_rng(0))
    before = evaluate_dataset(ds, spec, params)
    x = np.concatenate([u.x_train for u in ds.units.values()])
    y = np.concatenate([u.y_train for u in ds.units.values()])
    config = msgspec.structs.replace(default_train_config(ds), local_epochs=10)
    trained, result = train_local(spec, params, x, y, config, np.random.default_rng(0))
    assert result.steps == config.max_steps == 500
    after = evaluate_dataset(ds, spec, trained)
    assert after["rmse"] < 0.4 * before["rmse"] and after["rmse"] < 150  # kW
    assert after["roc_auc"] > 0.8
    per_unit = evaluate_dataset(ds, spec, trained, unit="R80790")
    assert set(per_unit) >= {"rmse", "mae", "roc_auc"}


def test_default_specs_fit_each_data_set(batteries):
    synth = load_dataset("synthetic", gateways=2, max_rows_per_unit=200)
    spec = default_spec(synth)
    assert spec.layer_sizes == (24, 32, 4) and spec.task == "classification"
    assert sum(a * b + b for a, b in zip(spec.layer_sizes, spec.layer_sizes[1:], strict=False)) == 932
    assert default_spec(batteries).layer_sizes[0] == len(batteries.features)
    assert default_train_config(batteries).optimizer == "sgd"
