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
