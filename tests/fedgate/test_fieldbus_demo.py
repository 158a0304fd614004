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
from edge.main import load_local_data, store_rows
from edge.store import SampleStore
from fedcore.datasets.wind import DATA_FILE, SCADA_COLUMNS, load_wind_rows, wind_unit_from_rows
from fedcore.errors import ConfigError
from fedcore.samples import Sample

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


def _scaler_table(dataset) -> str:  # type: ignore[no-untyped-def]
    s = dataset.scaler
    return ("[data.scaler]\n"
            f"feature_mean = [{', '.join(repr(float(v)) for v in s.feature_mean)}]\n"
            f"feature_std = [{', '.join(repr(float(v)) for v in s.feature_std)}]\n"
            f"target_mean = {float(s.target_mean)!r}\ntarget_std = {float(s.target_std)!r}\n")


def test_store_source_gives_the_direct_paths_arrays_for_the_same_rows(tmp_path: Path) -> None:
    unit = "R80721"
    store = tmp_path / "samples.db"
    _write_store_from_dataset(store, unit, FIRST - 50, COUNT + 100)  # more than the window
    direct = load_wind_rows(FIRST, COUNT)
    config = load_edge_config(_edge_toml(tmp_path, (
        f'[data]\nsource = "store"\nstore = "{store}"\ndevice = "{unit}"\n'
        f"first_row = {FIRST}\nnum_rows = {COUNT}\n" + _scaler_table(direct))))
    got = load_local_data(config)
    want = direct.units[unit]
    # the test split does not depend on plant-level context: identical, bit for bit
    assert got.x_test.tobytes() == want.x_test.tobytes() and got.x_test.shape[0] > 100
    assert got.y_test.tobytes() == want.y_test.tobytes()
    assert got.target_scale == pytest.approx(direct.scaler.target_std, rel=0, abs=0)
    # training rows: exactly the direct path's rules without the plant context
    local = load_wind_rows(FIRST, COUNT, plant_context=False)
    raw = wind_unit_from_rows(*_dataset_rows(unit, FIRST, COUNT))
    assert got.x_train.tobytes() == direct.scaler.transform(raw.x_train).tobytes()
    assert got.y_train.tobytes() == direct.scaler.transform_target(raw.y_train).tobytes()
    assert len(got.y_train) == local.units[unit].num_train > 100
    # and the plant context only removes training rows, never adds or changes them
    x_direct = {r.tobytes() for r in want.x_train}
    assert x_direct <= {r.tobytes() for r in got.x_train}


def _dataset_rows(unit: str, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    with np.load(DATA_FILE) as npz:
        return (npz[f"{unit}_time"][first:first + count],
                np.asarray(npz[f"{unit}_values"][first:first + count], dtype=np.float32))


def test_store_source_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data.scaler"):
        load_edge_config(_edge_toml(tmp_path, '[data]\nsource = "store"\nstore = "s.db"\ndevice = "d"\n'))
    with pytest.raises(ConfigError, match="data.device"):
        load_edge_config(_edge_toml(tmp_path, '[data]\nsource = "store"\nstore = "s.db"\n'))
    with pytest.raises(ConfigError, match="feature_std"):
        load_edge_config(_edge_toml(tmp_path, (
            '[data]\nsource = "store"\nstore = "s.db"\ndevice = "d"\n'
            "[data.scaler]\nfeature_mean = [0.0, 1.0]\nfeature_std = [1.0]\n")))


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
    assert 'source = "store"' in edge_conf and "[data.scaler]" in edge_conf
    assert "rows crossed Modbus" in proc.stdout
