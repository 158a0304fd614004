"""The bridge as a service: `fedgate bridge run` under a fake systemd notify socket, probe."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from edge.store import SampleStore
from fedcore.errors import EXIT_CODES
from firmware_bridge.probe import probe
from firmware_bridge.simulator import (
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_config,
    wind_bridge_toml,
)

from .conftest import free_port


def test_run_notifies_systemd_and_stops_cleanly(tmp_path: Path, sim: SimulatorServer) -> None:
    port = sim.add(SimulatedTurbine("R80711", speed=60000.0), 0)
    cfg_path = tmp_path / "bridge.toml"
    cfg_path.write_text(
        wind_bridge_toml([SimulatedDevice("t1", port)], tmp_path / "s.db", period=0.05)
    )
    notify_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(20)
    env = dict(os.environ, NOTIFY_SOCKET=notify_path, WATCHDOG_USEC="400000")
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(cfg_path)], env=env
    )
    try:
        messages = [sock.recv(4096).decode()]
        assert messages[0].startswith("READY=1")
        while not any(m.startswith("WATCHDOG=1") for m in messages):
            messages.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        sock.settimeout(2)
        while not messages[-1].startswith("STOPPING=1"):
            messages.append(sock.recv(4096).decode())  # raises if it never comes
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
    store = SampleStore(tmp_path / "s.db")
    assert store.count("t1") >= 9 and store.count("t1") % 9 == 0  # whole polls only
    store.close()


def test_bad_config_exits_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[bridge]\nstore = "s.db"\n')
    rc = subprocess.run(
        [sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(bad)],
        capture_output=True,
        text=True,
    )
    assert rc.returncode == 78 and "device" in rc.stderr
    assert 78 in EXIT_CODES


def test_probe_once_shows_values_and_dead_devices(tmp_path: Path, sim: SimulatorServer) -> None:
    port = sim.add(SimulatedTurbine("R80721"), 0)
    dead = free_port()
    cfg = wind_bridge_config(
        [SimulatedDevice("alive", port), SimulatedDevice("dead", dead)],
        tmp_path / "s.db",
        folder=tmp_path,
        timeout=0.3,
    )
    out = io.StringIO()
    assert probe(cfg, once=True, out=out) == 1  # not every signal could be read
    lines = out.getvalue().splitlines()
    alive_p = next(line for line in lines if line.startswith("alive") and " P_avg " in line)
    assert " kW " in alive_p and alive_p.split()[2] == "441.06"  # R80721's first row
    dead_p = next(line for line in lines if line.startswith("dead") and " P_avg " in line)
    assert "DOWN" in dead_p and f"127.0.0.1:{dead}" in dead_p


def test_store_sink_applies_the_eviction_policy(tmp_path: Path) -> None:
    from fedcore.samples import Sample
    from firmware_bridge.config import StoreSpec
    from firmware_bridge.runtime import StoreSink

    sink = StoreSink(
        StoreSpec(tmp_path / "s.db", max_bytes=10**9, max_age_s=60.0, flush_interval=0.5)
    )
    assert sink.write([Sample("d", "x", float(t), 1.0) for t in range(100)]) == 100
    result = sink.maintain(now=120.0)  # cut at 60 s
    assert (result.by_age, result.by_size) == (60, 0)
    sink.close()
    store = SampleStore(tmp_path / "s.db")
    assert store.count("d") == 40 and store.rows("d", ["x"]).time[0] == 60.0
    store.close()
