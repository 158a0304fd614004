"""The unit files pass `systemd-analyze verify`, and the services speak sd_notify."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.demo_configs import DemoOptions, write_configs

ROOT = Path(__file__).resolve().parents[1]
UNITS = sorted((ROOT / "systemd").glob("*.service"))


def test_there_is_a_unit_per_service() -> None:
    assert {u.name for u in UNITS} == {
        "fedgate-aggregator.service",
        "fedgate-edge.service",
        "fedgate-bridge.service",
    }


@pytest.mark.parametrize("unit", UNITS, ids=lambda u: u.name)
def test_unit_passes_systemd_analyze_verify(unit: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian package systemd; scripts/test installs it)"
    proc = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    # verify warns about the service user and the ExecStart binary not existing on this host;
    # anything else (unknown keys, bad values) is a real problem
    problems = [
        line
        for line in proc.stderr.splitlines()
        if line.strip()
        and "fedgate" in line
        and "Command" not in line
        and "user" not in line.lower()
    ]
    assert not problems, proc.stderr
    text = unit.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
    ):
        assert line in text, f"{unit.name} lacks {line}"
    # 78 config error, 77 refused by the broker (certificate, ACL): a restart fixes neither
    assert {"77", "78"} <= set(_setting(unit, "RestartPreventExitStatus").split())


def _setting(unit: Path, key: str) -> str:
    values = [
        line.split("=", 1)[1].strip()
        for line in unit.read_text().splitlines()
        if line.startswith(f"{key}=")
    ]
    return " ".join(values)


def test_the_edge_unit_may_read_the_bridge_store_and_nothing_more() -> None:
    bridge, edge = (
        ROOT / "systemd" / "fedgate-bridge.service",
        ROOT / "systemd" / "fedgate-edge.service",
    )
    store_dir = "/var/lib/" + _setting(bridge, "StateDirectory")
    assert _setting(bridge, "Group") in _setting(edge, "SupplementaryGroups").split()
    dir_mode, umask = (
        int(_setting(bridge, "StateDirectoryMode"), 8),
        int(_setting(bridge, "UMask"), 8),
    )
    assert dir_mode & 0o050 == 0o050 and dir_mode & 0o007 == 0  # group enters and lists, others not
    assert umask & 0o040 == 0 and umask & 0o007 == 0o007  # files: group reads, others nothing
    assert _setting(edge, "ReadOnlyPaths").lstrip("-") == store_dir
    assert store_dir not in _setting(edge, "ReadWritePaths")


@pytest.mark.broker
def test_aggregator_reports_ready_watchdog_and_stopping(tmp_path: Path, mosquitto) -> None:
    dataset = load_dataset("synthetic", gateways=2, max_rows_per_unit=100)
    files = write_configs(
        tmp_path,
        mosquitto.url,
        DemoOptions(dataset="synthetic", task="sdn"),
        dataset,
        default_spec(dataset),
        default_train_config(dataset),
    )
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(30)
    env = {**os.environ, "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate", "aggregator", "run", "-c", str(files.aggregator)], env=env
    )
    try:
        states: list[str] = []
        while not (any("READY=1" in s for s in states) and "WATCHDOG=1" in states):
            states.append(sock.recv(4096).decode())
        proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in states:
            states.append(sock.recv(4096).decode())
        assert proc.wait(timeout=20) == 0
        ready = next(s for s in states if "READY=1" in s)
        status = next(line for line in ready.splitlines() if line.startswith("STATUS="))
        assert "round 1" in status
    finally:
        if proc.poll() is None:
            proc.kill()
        sock.close()
