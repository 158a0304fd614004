"""Smoke test of `fedgate demo` on the real wind data, small configuration."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_demo_runs_rounds_and_reports_baselines(tmp_path: Path, mosquitto) -> None:
    out = tmp_path / "run.json"
    proc = subprocess.run(
        [sys.executable, "-m", "fedgate", "demo", "--dataset", "wind", "--rounds", "2",
         "--max-rows-per-unit", "3000", "--broker", mosquitto.url, "--workdir", str(tmp_path / "w"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["metric"] == "rmse" and record["gateways"] == 4
    assert [r["round"] for r in record["rounds"]] == [1, 2]
    for r in record["rounds"]:
        assert r["participants"] == 4
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0 and r["wall_s"] > 0
        assert {"round", "participants", "metric", "bytes_up", "bytes_down", "wall_s"} <= set(r)
    for key in ("federated", "centralized", "local_only"):
        assert math.isfinite(record[key]) and record[key] > 0
    assert record["federated"] == record["rounds"][-1]["metric"]
    # the live table printed each round and the baselines
    assert "centralized" in proc.stdout and "local-only" in proc.stdout
    # the services' logs hold what they printed: a line per round
    aggregator_log = (tmp_path / "w" / "aggregator.log").read_text()
    assert "round 2 committed" in aggregator_log, aggregator_log
    assert "round 2: update sent" in (tmp_path / "w" / "edge-R80711.log").read_text()


def test_a_secure_demo_in_a_relative_folder_twice(tmp_path: Path) -> None:
    """`--secure --workdir wd` from the user's folder: the configs it writes hold absolute
    paths (a relative one would resolve against the config's own folder). Run again in the
    same folder, it is a new run: the earlier run's finished aggregator state and fleet CA
    made the second one wait forever."""
    for run in (1, 2):
        proc = subprocess.run(
            [sys.executable, "-m", "fedgate", "demo", "--secure", "--dataset", "wind", "--rounds", "1",
             "--max-rows-per-unit", "2000", "--workdir", "wd", "--out", "run.json"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert ("replacing the state of an earlier demo run" in proc.stdout) == (run == 2)
        assert json.loads((tmp_path / "run.json").read_text())["rounds"][0]["participants"] == 4
    assert f'"{tmp_path}/wd/fleet/aggregator/ca.crt"' in (tmp_path / "wd" / "aggregator.toml").read_text()


def test_a_table_whose_unit_names_are_not_valid_ids(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    """Units named as a plant names them (spaces, '/', '#', non-ASCII) become safe gateway
    ids; the mapping is printed and every file name derives from the safe id."""
    table = tmp_path / "plant.csv"
    rows = ["time,unit,x1,x2,y"]
    for unit in ("Line 1/A", "Linie #2", "Ü-3"):
        rows += [f"{i},{unit},{i % 7},{i % 5},{2 * (i % 7) - (i % 5)}" for i in range(300)]
    table.write_text("\n".join(rows) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedgate", "demo", "--dataset", f"csv:{table}", "--unit-column", "unit",
         "--target", "y", "--rounds", "1", "--broker", mosquitto.url, "--workdir", str(tmp_path / "w"),
         "--out", str(tmp_path / "run.json")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "'Line 1/A' -> gw-Line-1-A-" in proc.stdout
    assert json.loads((tmp_path / "run.json").read_text())["rounds"][0]["participants"] == 3
    assert not list((tmp_path / "w").glob("*Line 1*")) and len(list((tmp_path / "w").glob("edge-*.log"))) == 3


def test_demo_rejects_an_unknown_dataset(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "fedgate", "demo", "--dataset", "nope", "--rounds", "1",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 78
    assert "nope" in proc.stderr and "wind" in proc.stderr


def _processes_mentioning(text: str) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM"])
def test_ctrl_c_stops_every_service_cleanly(tmp_path: Path, mosquitto, how: str) -> None:
    import signal
    import time

    work = tmp_path / "ctrlc"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedgate", "demo", "--rounds", "50", "--max-rows-per-unit", "3000",
         "--broker", mosquitto.url, "--workdir", str(work)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    for line in proc.stdout:  # wait for the first round's row
        if line.split()[:1] == ["1"]:
            break
    assert _processes_mentioning(str(work)), "the services should be running"
    proc.send_signal(getattr(signal, how))
    out = proc.stdout.read()
    assert proc.wait(timeout=60) == 130
    assert "interrupted: stopping the services" in out
    deadline = time.monotonic() + 10
    while _processes_mentioning(str(work)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_mentioning(str(work)) == []
