"""The aggregator's Prometheus exporter reports rounds as they commit."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.broker import free_port
from fedgate.demo_configs import DemoOptions, write_configs

pytestmark = [pytest.mark.broker]


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def test_exporter_counts_rounds_and_updates(tmp_path: Path, mosquitto) -> None:
    dataset = load_dataset("synthetic", gateways=2, max_rows_per_unit=200)
    options = DemoOptions(dataset="synthetic", gateways=2, rounds=3, fleet="m", task="metrics")
    files = write_configs(tmp_path, mosquitto.url, options, dataset, default_spec(dataset),
                          default_train_config(dataset))
    port = free_port()
    text = files.aggregator.read_text().replace("[state]\n", f"[state]\nmetrics_port = {port}\n")
    files.aggregator.write_text(text.replace("min_participants = 1", "min_participants = 2"))
    procs = [subprocess.Popen([sys.executable, "-m", "fedgate", "aggregator", "run", "-c",
                               str(files.aggregator)])]
    procs += [subprocess.Popen([sys.executable, "-m", "fedgate", "edge", "run", "-c", str(p)])
              for p in files.edges.values()]
    try:
        deadline = time.monotonic() + 90
        values: dict[str, float] = {}
        while time.monotonic() < deadline:
            try:
                values = scrape(port)
            except OSError:
                values = {}
            if values.get("fedgate_round", 0) >= 3:
                break
            time.sleep(0.5)
        assert values.get("fedgate_round") == 3, values
        assert values["fedgate_model_version"] == 3
        assert values["fedgate_updates_accepted_total"] == 6  # 2 gateways x 3 rounds
        assert values["fedgate_round_participants"] == 2
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)


def test_a_resumed_aggregator_exports_its_state_at_once(tmp_path: Path, mosquitto) -> None:
    """After a restart the gauges say where the run is before any new round (not 0)."""
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=100)
    options = DemoOptions(dataset="synthetic", gateways=1, rounds=2, fleet="m", task="resume")
    files = write_configs(tmp_path, mosquitto.url, options, dataset, default_spec(dataset),
                          default_train_config(dataset))
    port = free_port()
    files.aggregator.write_text(files.aggregator.read_text().replace(
        "[state]\n", f"[state]\nmetrics_port = {port}\n"))
    run = [sys.executable, "-m", "fedgate", "aggregator", "run", "-c", str(files.aggregator)]
    procs = [subprocess.Popen(run), *(subprocess.Popen([sys.executable, "-m", "fedgate", "edge", "run",
                                                         "-c", str(p)]) for p in files.edges.values())]
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and _try(port).get('fedgate_phase{phase="finished"}') != 1:
            time.sleep(0.5)
        procs[0].send_signal(signal.SIGTERM)
        assert procs[0].wait(timeout=20) == 0
        procs[0] = subprocess.Popen(run)  # resumes the finished run: no round to run
        deadline = time.monotonic() + 30
        values: dict[str, float] = {}
        while time.monotonic() < deadline and not values:
            values = _try(port)
            time.sleep(0.2)
        assert values["fedgate_model_version"] == 2 and values["fedgate_round"] == 2, values
        assert values['fedgate_phase{phase="finished"}'] == 1
        assert values["fedgate_updates_accepted_total"] == 0  # counters count this process
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(timeout=20)


def _try(port: int) -> dict[str, float]:
    try:
        return scrape(port)
    except OSError:
        return {}
