"""How ``[data]`` with ``source = "store"`` in edge.toml becomes a RowSpec, and how each
wrong key is refused: a ConfigError naming the file, ``data.<key>`` and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edge.config import load_edge_config
from edge.rows import Condition, Feature
from fedcore.errors import ConfigError

DEVICE = '[device]\nid = "gw1"\nfleet = "plant1"\ntask = "wind"\n\n'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    return repr(value)


BASE: dict[str, Any] = {
    "source": "store",
    "store": "/var/lib/fedgate-bridge/samples.db",
    "device": "turbine",
    "task": "regression",
    "features": ["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)"],
    "target": "P_avg",
    "time_signal": "row_time",
    "record_signal": "row_seq",
    "resample_s": 600,
    "aggregate": "mean",
    "fill_gap_s": 1200,
    "exclude_when": ["P_avg <= 0 and Ws_avg > 4"],
    "holdout_every": 5,
    "holdout_block_s": 604800,
    "holdout_origin_s": 1388534400,
    "embargo_s": 86400,
    "window_rows": 50000,
    "window_days": 60,
    "min_rows": 500,
}


def edge_toml(tmp_path: Path, data: dict[str, Any], valid: dict[str, Any] | None = None) -> Path:
    lines = [DEVICE, "[data]"] + [f"{k} = {toml_value(v)}" for k, v in data.items()]
    if valid is not None:
        lines += ["", "[data.valid]"] + [f"{k} = {toml_value(v)}" for k, v in valid.items()]
    path = tmp_path / "edge.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def refused(tmp_path: Path, data: dict[str, Any], valid: dict[str, Any] | None = None) -> ConfigError:
    path = edge_toml(tmp_path, data, valid)
    with pytest.raises(ConfigError) as err:
        load_edge_config(path)
    assert err.value.file == str(path)
    return err.value


def test_a_store_task_becomes_a_row_spec(tmp_path: Path) -> None:
    cfg = load_edge_config(edge_toml(tmp_path, BASE, {"Ws_avg": [0, 40], "P_avg": [-100, 2255.5]}))
    data = cfg.data
    assert data.source == "store" and data.device == "turbine"
    assert data.store == Path("/var/lib/fedgate-bridge/samples.db")
    rows = data.rows
    assert rows is not None and rows.task == "regression" and rows.target == "P_avg"
    assert rows.features == (Feature("Ws_avg", "Ws_avg"), Feature("sin(Wa_avg)", "Wa_avg", "sin"),
                             Feature("cos(Wa_avg)", "Wa_avg", "cos"))
    assert rows.exclude == ((Condition("P_avg", "<=", 0.0), Condition("Ws_avg", ">", 4.0)),)
    assert rows.valid == (("Ws_avg", 0.0, 40.0), ("P_avg", -100.0, 2255.5))
    assert (rows.time_signal, rows.record_signal) == ("row_time", "row_seq")
    assert (rows.resample_s, rows.aggregate, rows.fill_gap_s) == (600.0, "mean", 1200.0)
    assert (rows.holdout_every, rows.holdout_block_s, rows.holdout_origin_s, rows.embargo_s) == (
        5, 604800.0, 1388534400.0, 86400.0)
    assert (rows.window_rows, rows.window_s, rows.min_rows) == (50000, 60 * 86400.0, 500)
    assert set(rows.signals) == {"Ws_avg", "Wa_avg", "P_avg", "row_time", "row_seq"}


def test_a_relative_store_path_is_taken_from_the_config_folder(tmp_path: Path) -> None:
    cfg = load_edge_config(edge_toml(tmp_path, {**BASE, "store": "bridge/samples.db"}))
    assert cfg.data.store == tmp_path / "bridge" / "samples.db"


def test_defaults_of_a_minimal_store_task(tmp_path: Path) -> None:
    minimal = {"source": "store", "store": "s.db", "device": "d", "features": ["a"], "target": "y"}
    rows = load_edge_config(edge_toml(tmp_path, minimal)).data.rows
    assert rows is not None and rows.task == "regression" and rows.resample_s == 0.0
    assert (rows.holdout_every, rows.window_rows, rows.window_s, rows.min_rows) == (5, 50000, 0.0, 200)
    anomaly = {**minimal, "task": "anomaly"}
    del anomaly["target"]
    assert load_edge_config(edge_toml(tmp_path, anomaly)).data.rows.target == ""


WRONG: list[tuple[str, Any, str]] = [
    # key, wrong value, what the message says (besides key and value)
    ("store", 5, "string"),
    ("store", "", ""),
    ("device", "", "[[device]]"),
    ("device", 3, "string"),
    ("task", "forecast", "one of"),
    ("features", [], "at least one"),
    ("features", ["Ws_avg", "tan(Wa_avg)"], "sin(SIGNAL)"),
    ("features", "Ws_avg", "list of strings"),
    ("features", ["Ws_avg", 3], "list of strings"),
    ("target", "", "required"),
    ("target", 7, "string"),
    ("time_signal", 1, "string"),
    ("record_signal", False, "string"),
    ("resample_s", -600, ">= 0"),
    ("resample_s", "10m", "number"),
    ("aggregate", "median", "one of"),
    ("fill_gap_s", -1, ">= 0"),
    ("exclude_when", ["P_avg <= 0 or Ws_avg > 4"], "joined by 'and'"),
    ("exclude_when", ["P_avg <="], "SIGNAL OP NUMBER"),
    ("exclude_when", "P_avg <= 0", "list of strings"),
    ("holdout_every", 1, "every block"),
    ("holdout_every", -5, ">= 0"),
    ("holdout_every", 2.5, "integer"),
    ("holdout_block_s", 0, ">= 1"),
    ("holdout_origin_s", "2014-01-01", "number"),
    ("embargo_s", -86400, ">= 0"),
    ("window_rows", 5, ">= 10"),
    ("window_rows", 1e6, "integer"),
    ("window_days", -1, ">= 0"),
    ("min_rows", 0, ">= 1"),
    ("min_rows", 60000, "window_rows"),
    ("resample", 600, "unknown key"),
]


@pytest.mark.parametrize(("key", "value", "problem"), WRONG, ids=[f"{k}={v!r}" for k, v, _ in WRONG])
def test_each_wrong_key_is_named_with_its_value(tmp_path: Path, key: str, value: Any, problem: str) -> None:
    err = refused(tmp_path, {**BASE, key: value})
    assert err.key == f"data.{key}"
    text = str(err)
    assert f"data.{key}" in text and problem in text
    shown = value[-1] if isinstance(value, list) and value else value  # a list names its bad item
    assert repr(shown) in text


def test_a_target_has_no_place_in_an_anomaly_task(tmp_path: Path) -> None:
    err = refused(tmp_path, {**BASE, "task": "anomaly"})
    assert err.key == "data.target" and "'P_avg'" in str(err) and "autoencoder" in str(err)


def test_a_missing_required_key_is_named(tmp_path: Path) -> None:
    for key in ("store", "device", "features"):
        data = dict(BASE)
        del data[key]
        err = refused(tmp_path, data)
        assert err.key == f"data.{key}" and "missing" in str(err)


@pytest.mark.parametrize("value", [[50, -40], [1], "x", [0, True], [0, "40"]])
def test_a_wrong_valid_range_is_named_with_its_signal(tmp_path: Path, value: Any) -> None:
    err = refused(tmp_path, BASE, {"Ot_avg": value})
    assert err.key == "data.valid.Ot_avg" and repr(value) in str(err) and "[low, high]" in str(err)


def test_a_scaler_table_is_refused_because_the_aggregator_now_sends_it(tmp_path: Path) -> None:
    err = refused(tmp_path, {**BASE, "scaler": {"mean": [1.0, 2.0], "std": [1.0, 1.0]}})
    assert err.key == "data.scaler"
    assert "aggregator" in str(err) and "remove [data.scaler]" in str(err)
    assert "'mean': [1.0, 2.0]" in str(err)


def test_keys_of_the_data_set_source_are_unknown_to_a_store(tmp_path: Path) -> None:
    err = refused(tmp_path, {**BASE, "unit": "R80711"})
    assert err.key == "data.unit" and "'R80711'" in str(err) and "unknown key" in str(err)


def test_broker_max_message_sets_what_the_gateway_takes_in(tmp_path: Path) -> None:
    path = edge_toml(tmp_path, BASE)
    path.write_text(path.read_text() + "\n[broker]\nmax_payload = 262144\nmax_message = 67108864\n")
    config = load_edge_config(path)
    assert (config.broker.max_payload, config.broker.max_message) == (262144, 64 * 1024 * 1024)
    path.write_text(path.read_text().replace("max_message = 67108864", "max_message = 10"))
    with pytest.raises(ConfigError) as exc:
        load_edge_config(path)
    assert (exc.value.key, exc.value.value) == ("broker.max_message", 10)


def spool_config(tmp_path: Path, spool: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(DEVICE + '[data]\nunit = "R80711"\n\n' + spool)
    return path


def test_the_spool_bounds_default_and_are_read(tmp_path: Path) -> None:
    default = load_edge_config(spool_config(tmp_path, "")).spool
    assert (default.max_entries, default.max_bytes) == (1000, 64 * 1024 * 1024)
    set_ = load_edge_config(spool_config(tmp_path, "[spool]\nmax_entries = 5\nmax_bytes = 70000\n")).spool
    assert (set_.max_entries, set_.max_bytes) == (5, 70000)


@pytest.mark.parametrize(("text", "key", "value"), [
    ("max_entries = 0", "spool.max_entries", 0),
    ("max_bytes = 100", "spool.max_bytes", 100),
    ('max_bytes = "64M"', "spool.max_bytes", "64M"),
    ("max_mb = 64", "spool.max_mb", 64),
])
def test_a_wrong_spool_key_is_named_with_its_value(tmp_path: Path, text: str, key: str, value: Any) -> None:
    path = spool_config(tmp_path, f"[spool]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_edge_config(path)
    assert (err.value.file, err.value.key, err.value.value) == (str(path), key, value)


def test_the_privacy_policy_defaults_to_none_and_is_read(tmp_path: Path) -> None:
    default = load_edge_config(spool_config(tmp_path, "")).privacy
    assert (default.require, default.min_noise_multiplier, default.max_epsilon, default.delta) == (
        "none", 0.0, 0.0, 1e-5)
    text = ('[privacy]\nrequire = "update"\nmin_noise_multiplier = 0.8\nmax_epsilon = 8.0\n'
            'delta = 1e-6\n')
    set_ = load_edge_config(spool_config(tmp_path, text)).privacy
    assert (set_.require, set_.min_noise_multiplier, set_.max_epsilon, set_.delta) == (
        "update", 0.8, 8.0, 1e-6)


@pytest.mark.parametrize(("text", "key", "value"), [
    ('require = "full"', "privacy.require", "full"),
    ('require = "update"\nmin_noise_multiplier = -1', "privacy.min_noise_multiplier", -1),
    ('require = "update"\nmax_epsilon = nan', "privacy.max_epsilon", "nan"),
    ('require = "update"\nmax_epsilon = inf', "privacy.max_epsilon", "inf"),
    ('require = "record"\ndelta = 0', "privacy.delta", 0),
    ('require = "record"\ndelta = 0.9', "privacy.delta", 0.9),
    ("max_epsilon = 3.0", "privacy.max_epsilon", 3.0),  # a budget needs a required level
    ("min_noise_multiplier = 1.0", "privacy.min_noise_multiplier", 1.0),
    ("epsilon = 3.0", "privacy.epsilon", 3.0),
])
def test_a_wrong_privacy_key_is_named_with_its_value(tmp_path: Path, text: str, key: str, value: Any) -> None:
    path = spool_config(tmp_path, f"[privacy]\n{text}\n")
    with pytest.raises(ConfigError) as err:
        load_edge_config(path)
    got = err.value.value
    assert (err.value.file, err.value.key, str(got) if value in ("nan", "inf") else got) == (
        str(path), key, value)


def test_the_privacy_example_of_the_configuration_reference_loads(tmp_path: Path) -> None:
    page = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    section = page.split("### A gateway's own privacy policy (`[privacy]`)", 1)[1]
    example = section.split("```toml\n", 1)[1].split("```", 1)[0]
    policy = load_edge_config(spool_config(tmp_path, example)).privacy
    assert (policy.require, policy.min_noise_multiplier, policy.max_epsilon) == ("update", 0.8, 8.0)
