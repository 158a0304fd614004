"""The bridge as a service: `fedgate bridge run` under a fake systemd notify socket, its
Prometheus metrics, probe. (tests/test_unit_sandbox.py runs it under its systemd unit.)"""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from edge.store import SampleStore
from fedcore.errors import EXIT_CODES
from fedcore.samples import connect
from firmware_bridge.probe import probe
from firmware_bridge.simulator import (
    SimulatedDevice,
    SimulatedTurbine,
    SimulatorServer,
    wind_bridge_config,
    wind_bridge_toml,
)

from .conftest import free_port, wait_for


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
        assert messages[0].startswith("READY=1")  # nothing before: no watchdog pings either
        assert re.search(r"STATUS=\d+ samples written, 0 of 1 devices down", messages[0])
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
    assert probe(cfg, once=True, out=out) == 69  # not every signal could be read: unavailable
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


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of every sample on the bridge's /metrics page."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        assert reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = reply.read().decode()
    return {
        m.group(1): float(m.group(2))
        for m in re.finditer(r"^(fedgate_bridge_\S+) (\S+)$", text, re.MULTILINE)
    }


def test_metrics_agree_with_the_store(tmp_path: Path, sim: SimulatorServer) -> None:
    alive = sim.add(SimulatedTurbine("R80711", advance="read"), 0)
    metrics_port = free_port()
    store_path = tmp_path / "s.db"
    cfg_path = tmp_path / "bridge.toml"
    devices = [SimulatedDevice("alive", alive), SimulatedDevice("dead", free_port())]
    text = wind_bridge_toml(devices, store_path, period=0.05, timeout=0.3)
    cfg_path.write_text(text.replace("[bridge]\n", f"[bridge]\nmetrics_port = {metrics_port}\n", 1))
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(cfg_path)])

    def written() -> float:
        try:
            return scrape(metrics_port).get("fedgate_bridge_samples_written_total", 0.0)
        except OSError:
            return 0.0  # not listening yet

    def stored() -> int:
        conn = connect(store_path, readonly=True)
        try:
            return int(conn.execute("SELECT count(*) FROM samples").fetchone()[0])
        finally:
            conn.close()

    try:
        wait_for(lambda: written() >= 20 * 9, 30, "samples written")
        sim.remove(alive)  # the device disappears: from now on nothing new is read
        wait_for(
            lambda: scrape(metrics_port)['fedgate_bridge_device_up{device="alive"}'] == 0,
            20,
            "the device to be seen down",
        )
        wait_for(lambda: written() == stored(), 20, "the last reads to be flushed")
        m = scrape(metrics_port)
        count = stored()
        assert m["fedgate_bridge_samples_written_total"] == count
        assert m['fedgate_bridge_device_good_reads_total{device="alive"}'] == count
        assert m['fedgate_bridge_device_good_reads_total{device="dead"}'] == 0
        assert m['fedgate_bridge_device_failed_reads_total{device="dead"}'] >= 9  # per signal
        assert m['fedgate_bridge_device_failed_reads_total{device="alive"}'] >= 9
        assert m['fedgate_bridge_device_up{device="dead"}'] == 0
        assert (
            started
            < m['fedgate_bridge_device_last_success_timestamp_seconds{device="alive"}']
            < time.time()
        )
        assert 'fedgate_bridge_device_last_success_timestamp_seconds{device="dead"}' not in m
        wal = Path(f"{store_path}-wal")
        assert m["fedgate_bridge_store_bytes"] == store_path.stat().st_size + wal.stat().st_size
        assert m["fedgate_bridge_store_limit_bytes"] == 256 * 1024 * 1024
        assert m['fedgate_bridge_rows_evicted_total{reason="age"}'] == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_metrics_port_taken_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg_path = tmp_path / "bridge.toml"
        text = wind_bridge_toml([SimulatedDevice("t", free_port())], tmp_path / "s.db")
        cfg_path.write_text(text.replace("[bridge]\n", f"[bridge]\nmetrics_port = {port}\n", 1))
        rc = subprocess.run(
            [sys.executable, "-m", "fedgate", "bridge", "run", "-c", str(cfg_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert rc.returncode == 78 and "bridge.metrics_port" in rc.stderr
