"""Modbus TCP against real pymodbus servers on loopback: data path and failure modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedgate.fieldbus_demo import store_rows
from firmware_bridge.runtime import Bridge, NullSink, run_bridge
from firmware_bridge.simulator import (
    Fault,
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_config,
    wind_data_path,
)

from .conftest import wait_for


def test_rows_cross_modbus_unchanged(tmp_path: Path, sim: SimulatorServer) -> None:
    a = sim.add(SimulatedTurbine("R80711", advance="read"), 0)
    b = sim.add(SimulatedTurbine("R80790", advance="read", start_row=12600), 0)
    cfg = wind_bridge_config(
        [SimulatedDevice("R80711", a), SimulatedDevice("R80790", b)],
        tmp_path / "s.db",
        period=0.01,
        folder=tmp_path,
    )
    stats = run_bridge(cfg, until_polls_per_device=130, seed=1)
    assert stats.written >= 2 * 9 * 130
    with np.load(wind_data_path()) as data:
        for unit, first in (("R80711", 0), ("R80790", 12600)):
            _, t, v = store_rows(tmp_path / "s.db", unit)
            assert len(t) >= 130 and v.dtype == np.float32 and v.shape == (len(t), 7)
            # Every row is the data set's row, bit for bit, in order, none skipped.
            np.testing.assert_array_equal(t, data[f"{unit}_time"][first : first + len(t)])
            np.testing.assert_array_equal(v, data[f"{unit}_values"][first : first + len(t)])
    # R80790's slice crosses the clock change, where the export repeats timestamps: the
    # record number keeps both rows of each repeated time, as the data set does.
    assert (np.diff(t) == 0).sum() >= 5


def _two_devices(tmp_path: Path, sim: SimulatorServer) -> tuple[Bridge, int, int]:
    good = sim.add(SimulatedTurbine("R80721"), 0)
    bad = sim.add(SimulatedTurbine("R80736"), 0)
    cfg = wind_bridge_config(
        [SimulatedDevice("good", good), SimulatedDevice("bad", bad)],
        tmp_path / "s.db",
        period=0.05,
        folder=tmp_path,
        timeout=0.3,
    )
    return Bridge(cfg, sink=NullSink(), seed=3), good, bad


def _reads(bridge: Bridge, device: str) -> int:
    return bridge.health()[device].signals["P_avg"].reads


def test_timeout_then_back_and_others_keep_flowing(tmp_path: Path, sim: SimulatorServer) -> None:
    bridge, _, bad = _two_devices(tmp_path, sim)
    sim.set_fault(bad, Fault.TIMEOUT)
    bridge.start()
    try:
        health = bridge.health()
        wait_for(
            lambda: health["bad"].failures >= 2, what="the silent device to be marked down twice"
        )
        assert not health["bad"].up
        assert health["bad"].signals["P_avg"].reads == 0
        assert health["bad"].signals["P_avg"].errors >= 2
        assert health["bad"].signals["P_avg"].last_good is None
        before = _reads(bridge, "good")
        wait_for(
            lambda: _reads(bridge, "good") >= before + 10,
            what="the healthy device to keep being read",
        )
        assert health["good"].up and health["good"].signals["P_avg"].errors == 0
        sim.set_fault(bad, Fault.NONE)
        wait_for(
            lambda: health["bad"].up and _reads(bridge, "bad") > 0, what="the device to come back"
        )
        assert health["bad"].failures == 0 and health["bad"].signals["P_avg"].last_good is not None
    finally:
        bridge.stop()


def test_exception_codes_count_errors_without_backoff(tmp_path: Path, sim: SimulatorServer) -> None:
    bridge, _, bad = _two_devices(tmp_path, sim)
    sim.set_fault(bad, Fault.EXCEPTION, code=2)
    bridge.start()
    try:
        health = bridge.health()
        wait_for(
            lambda: health["bad"].signals["Ws_avg"].errors >= 3,
            what="exception replies to be counted",
        )
        sig = health["bad"].signals["Ws_avg"]
        assert "code 2 (illegal data address)" in sig.last_error
        assert sig.reads == 0
        assert health["bad"].up  # it answered: alive, so no backoff
        sim.set_fault(bad, Fault.NONE)
        wait_for(lambda: _reads(bridge, "bad") > 0, what="reads after the exception stops")
        assert _reads(bridge, "good") > 0
    finally:
        bridge.stop()


def test_device_disappears_and_comes_back(tmp_path: Path, sim: SimulatorServer) -> None:
    bridge, _, bad = _two_devices(tmp_path, sim)
    bridge.start()
    try:
        health = bridge.health()
        wait_for(lambda: _reads(bridge, "bad") > 0, what="first reads")
        turbine = sim.remove(bad)
        wait_for(lambda: not health["bad"].up, what="the vanished device to be marked down")
        wait_for(lambda: health["bad"].failures >= 3, what="retries with backoff")
        assert f"127.0.0.1:{bad}" in health["bad"].signals["row_time"].last_error
        sim.add(turbine, bad)
        n = _reads(bridge, "bad")
        wait_for(
            lambda: health["bad"].up and _reads(bridge, "bad") > n,
            timeout=15,
            what="the device to be back",
        )
    finally:
        bridge.stop()
