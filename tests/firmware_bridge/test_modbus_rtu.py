"""Modbus RTU over a pty pair made by socat: two turbines on one simulated RS-485 line."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fedcore.samples import Sample
from firmware_bridge.config import load_bridge_config
from firmware_bridge.modbus import ModbusPoller, PymodbusLink
from firmware_bridge.simulator import (
    WIND_MAP,
    Fault,
    SimulatedTurbine,
    SimulatorServer,
    wind_data_path,
)

from .conftest import wait_for


@pytest.fixture
def pty_pair(tmp_path: Path) -> Iterator[tuple[str, str]]:
    # Fails rather than skips without socat (like the broker tests without Mosquitto):
    # CI must install it (Debian package `socat`).
    if shutil.which("socat") is None:
        pytest.fail("socat is not installed (apt-get install socat)")
    a, b = tmp_path / "plc", tmp_path / "gateway"
    proc = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={a}", f"pty,raw,echo=0,link={b}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: a.exists() and b.exists(), what="socat's ptys")
        yield str(a), str(b)
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def _rtu_config(tmp_path: Path, port: str) -> Path:
    signals = WIND_MAP.read_text().split("[[device.signal]]", 1)[1]
    text = '[bridge]\nstore = "s.db"\n'
    for name, uid in (("north", 1), ("south", 2)):
        text += (
            f'[[device]]\nname = "{name}"\nprotocol = "modbus_rtu"\nserial_port = "{port}"\n'
            f"baudrate = 115200\nunit_id = {uid}\ntimeout = 0.5\nretries = 0\n\n[[device.signal]]{signals}\n"
        )
    path = tmp_path / "rtu.toml"
    path.write_text(text)
    return path


def test_rtu_multidrop_reads_real_rows(
    tmp_path: Path, pty_pair: tuple[str, str], sim: SimulatorServer
) -> None:
    plc, gateway = pty_pair
    sim.add_rtu(
        {
            1: SimulatedTurbine("R80711", advance="read"),
            2: SimulatedTurbine("R80736", advance="read"),
        },
        plc,
        115200,
    )
    cfg = load_bridge_config(_rtu_config(tmp_path, gateway))
    link = PymodbusLink(cfg.devices[0].link, timeout=0.5)  # type: ignore[arg-type]
    pollers = [ModbusPoller(d, link, random.Random(0), 0.0) for d in cfg.devices]
    got: dict[str, list[Sample]] = {"north": [], "south": []}
    try:
        for step in range(3):
            for p in pollers:
                got[p.spec.name].extend(p.poll(float(step) * 10, 1000.0 + step))
    finally:
        link.close()
    with np.load(wind_data_path()) as data:
        for name, unit in (("north", "R80711"), ("south", "R80736")):
            rows = [s for s in got[name] if s.signal == "P_avg"]
            times = [s.value for s in got[name] if s.signal == "row_time"]
            assert len(rows) == 3, pollers[0].health
            assert times == [float(t) for t in data[f"{unit}_time"][:3]]
            assert [s.value for s in rows] == [float(v) for v in data[f"{unit}_values"][:3, 1]]
            assert {s.ts for s in got[name]} == {1000.0, 1001.0, 1002.0}


def test_rtu_silent_unit_times_out_and_neighbour_still_answers(
    tmp_path: Path, pty_pair: tuple[str, str], sim: SimulatorServer
) -> None:
    plc, gateway = pty_pair
    silent = SimulatedTurbine("R80736", advance="read")
    sim.add_rtu({1: SimulatedTurbine("R80711", advance="read"), 2: silent}, plc, 115200)
    sim.loop.call_soon_threadsafe(silent.set_fault, Fault.TIMEOUT)
    cfg = load_bridge_config(_rtu_config(tmp_path, gateway))
    link = PymodbusLink(cfg.devices[0].link, timeout=0.3)  # type: ignore[arg-type]
    north, south = (ModbusPoller(d, link, random.Random(0), 0.0) for d in cfg.devices)
    try:
        assert south.poll(0.0, 1.0) == []
        assert not south.health.up and south.health.retry_at > 0.0
        assert south.health.signals["P_avg"].errors == 1
        assert "rtu://" in south.health.signals["P_avg"].last_error
        assert south.poll(0.01, 1.0) == []  # backing off: not even asked
        assert south.health.signals["P_avg"].errors == 1
        # The silent unit does not poison the line for its neighbour.
        assert len(north.poll(0.0, 1.0)) == 9 and north.health.up
    finally:
        sim.loop.call_soon_threadsafe(silent.set_fault, Fault.NONE)
        link.close()
