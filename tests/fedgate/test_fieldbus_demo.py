"""`fedgate demo --field-bus`: rows cross Modbus into the stores, and the store source builds
the same arrays as the data set's direct path."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.config import load_edge_config
from edge.main import make_source
from edge.store import SampleStore
from fedcore.datasets.wind import DATA_FILE, SCADA_COLUMNS, load_wind_rows, wind_unit_from_rows
from fedcore.errors import ConfigError
from fedcore.samples import Sample
from fedgate.demo_configs import WIND_STORE_TASK, WIND_VALID
from fedgate.fieldbus_demo import store_rows

# Rows 3600..4199 hold the end of a training week and the start of a test week (week 4).
FIRST, COUNT = 3600, 600


def _write_store_from_dataset(path: Path, unit: str, first: int, count: int) -> None:
    """A store as the bridge writes it (same signal names, one ts per poll), without Modbus."""
    with np.load(DATA_FILE) as npz:
        times = npz[f"{unit}_time"]
        values = np.asarray(npz[f"{unit}_values"], dtype=np.float32)
    store = SampleStore(path)
    batch = []
    for record in range(first, first + count):
        ts = 1_000_000.0 + record  # bridge time of the poll
        batch.append(Sample(unit, "row_time", ts, float(times[record]), "s"))
        batch.append(Sample(unit, "row_seq", ts, float(record)))
        for j, name in enumerate(SCADA_COLUMNS):
            batch.append(Sample(unit, name, ts, float(values[record, j])))
    store.append(batch)
    store.close()


def _edge_toml(tmp_path: Path, data: str) -> Path:
    path = tmp_path / "edge.toml"
    path.write_text(f'[device]\nid = "gw-1"\nfleet = "f"\ntask = "t"\n'
                    f'[broker]\nurl = "mqtt://127.0.0.1:1883"\n{data}')
    return path


def _toml_value(v: object) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return f'"{v}"' if isinstance(v, str) else repr(v)


def _wind_task(store: Path, unit: str) -> str:
    """The wind task as the demo (and examples/edge.toml) writes it on the turbine's signals."""
    lines = ['[data]', 'source = "store"', f'store = "{store}"', f'device = "{unit}"', "min_rows = 1"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in WIND_STORE_TASK.items()]
    lines += ["[data.valid]"] + [f"{k} = {_toml_value(v)}" for k, v in WIND_VALID.items()]
    return "\n".join(lines) + "\n"


def test_the_generic_store_path_rebuilds_the_data_sets_rows(tmp_path: Path) -> None:
    """The wind task written on signal names (features, exclusion, valid ranges, week-block
    holdout) gives the direct path's own rows, without the plant-level context a turbine's
    registers do not carry: training rows bit for bit, holdout = its normal test rows."""
    unit = "R80721"
    store = tmp_path / "samples.db"
    _write_store_from_dataset(store, unit, FIRST, COUNT)
    config = load_edge_config(_edge_toml(tmp_path, _wind_task(store, unit)))
    snap = make_source(config).snapshot(-math.inf)
    raw = wind_unit_from_rows(*_dataset_rows(unit, FIRST, COUNT))  # context=None
    assert snap.ready and len(snap.x_train) > 100 and len(snap.x_holdout) > 100
    assert snap.x_train.tobytes() == np.asarray(raw.x_train, np.float64).tobytes()
    assert snap.y_train.tobytes() == np.asarray(raw.y_train, np.float64).tobytes()
    normal = raw.test_labels == 0
    assert snap.x_holdout.tobytes() == np.asarray(raw.x_test[normal], np.float64).tobytes()
    # and the plant context of the direct path only removes training rows
    direct = load_wind_rows(FIRST, COUNT)
    x_direct = {r.tobytes() for r in direct.scaler.transform(snap.x_train)}
    assert {r.tobytes() for r in direct.units[unit].x_train} <= x_direct


def _dataset_rows(unit: str, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_FILE) as npz:
        return (npz[f"{unit}_time"][first:first + count],
                np.asarray(npz[f"{unit}_values"][first:first + count], dtype=np.float32))


def test_store_source_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.scaler"):
        load_edge_config(_edge_toml(tmp_path, '[data]\nsource = "store"\nstore = "s.db"\ndevice = "d"\n'
                                    'features = ["a"]\ntarget = "b"\n[data.scaler]\nfeature_mean = [0.0]\n'))
    with pytest.raises(ConfigError, match="data.device"):
        load_edge_config(_edge_toml(tmp_path, '[data]\nsource = "store"\nstore = "s.db"\n'))
    with pytest.raises(ConfigError, match="data.features"):
        load_edge_config(_edge_toml(tmp_path, '[data]\nsource = "store"\nstore = "s.db"\ndevice = "d"\n'
                                    'features = ["tan(x)"]\ntarget = "y"\n'))


@pytest.mark.slow
def test_field_bus_demo_trains_on_rows_that_crossed_modbus(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    out, work = tmp_path / "run.json", tmp_path / "w"
    proc = subprocess.run(
        [sys.executable, "-m", "fedgate", "demo", "--field-bus", "--field-bus-start", str(FIRST),
         "--field-bus-rows", str(COUNT), "--rounds", "2", "--broker", mosquitto.url,
         "--workdir", str(work), "--out", str(out), "--timeout", "120"],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    assert all(r["participants"] == 4 for r in record["rounds"])
    assert math.isfinite(record["federated"]) and record["federated"] > 0
    fb = record["field_bus"]
    assert fb["mode"] == "modbus" and fb["rows"] == COUNT
    assert set(fb["per_gateway"]) == {"R80711", "R80721", "R80736", "R80790"}
    for unit, c in fb["per_gateway"].items():
        assert c["rows_in_window"] == COUNT and c["identical"] == COUNT
        # independently of the demo's own check: the store holds the data set's rows
        seq, t, values = store_rows(work / f"store-gw-{unit}.db", unit)
        window = (seq >= FIRST) & (seq < FIRST + COUNT)
        assert np.array_equal(np.sort(seq[window]), np.arange(FIRST, FIRST + COUNT))
        ref_t, ref_v = _dataset_rows(unit, FIRST, COUNT)
        order = np.argsort(seq[window])
        assert np.array_equal(t[window][order], ref_t)
        assert np.array_equal(values[window][order], ref_v, equal_nan=True)
    # the gateways' configs read the store, not the data set
    edge_conf = (work / "edge-gw-R80711.toml").read_text()
    assert 'source = "store"' in edge_conf and 'features = ["Ws_avg", "sin(Wa_avg)"' in edge_conf
    assert "rows crossed Modbus" in proc.stdout
