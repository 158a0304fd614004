"""`fedgate demo` on a rare-event table: positive-class F1 headline, --metric, baselines on
every metric in run.json."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.wind_stops_table import write_table

pytestmark = [pytest.mark.broker, pytest.mark.slow]

FEATURES = "Ws_avg,sin_Wa,cos_Wa,Ot_avg,Va_avg"


def _demo(tmp_path: Path, table: Path, *extra: str, url: str = "") -> subprocess.CompletedProcess[str]:
    """One demo run in its own folder ``tmp_path`` (a fresh workdir: no earlier run's state)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        [sys.executable, "-m", "fedgate", "demo", "--dataset", f"csv:{table}", "--unit-column", "turbine",
         "--target", "stopped", "--features", FEATURES, "--task", "classification",
         "--max-rows-per-unit", "3000", "--workdir", str(tmp_path / "w"), "--out", str(tmp_path / "run.json"),
         *(["--broker", url] if url else []), *extra],
        capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("rare") / "wind-stops.csv"
    stats = write_table(path, rows_per_turbine=20000)
    assert 0 < stats["positive_rate"] < 0.05  # a rare event
    return path


def test_rare_event_headline_is_positive_f1_with_baselines_on_every_metric(
        tmp_path: Path, table: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    proc = _demo(tmp_path, table, "--rounds", "2", url=mosquitto.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["metric"] == "f1_pos" and record["higher_is_better"] is True
    assert 0 < record["positive_rate"]["train"] < 0.2
    assert "positive rate" in proc.stdout
    base = record["baselines"]
    expected = {"accuracy", "f1", "precision", "recall", "loss", "f1_pos", "precision_pos",
                "recall_pos", "pr_auc", "positive_rate"}
    assert set(base["centralized"]) == expected and set(base["local_only"]) == expected
    assert set(record["final_metrics"]) == expected
    for name in expected - {"pr_auc"}:  # PR AUC is NaN only without a positive test row
        assert math.isfinite(base["centralized"][name]) and math.isfinite(base["local_only"][name])
    assert record["centralized"] == base["centralized"]["f1_pos"]
    assert record["local_only"] == base["local_only"]["f1_pos"]
    assert set(base["local_only_per_gateway"]) == {"R80711", "R80721", "R80736", "R80790"}
    # the final table: the headline and every other metric beside the baselines
    lines = proc.stdout.splitlines()
    assert any(line.split()[:1] == ["f1_pos"] and line.endswith("<- headline") for line in lines)
    assert any(line.split()[:1] == ["pr_auc"] for line in lines)


def test_metric_option_picks_the_headline(tmp_path: Path, table: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    proc = _demo(tmp_path / "a", table, "--rounds", "1", "--metric", "pr_auc", url=mosquitto.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    assert record["metric"] == "pr_auc"
    assert record["federated"] == record["rounds"][-1]["metric"] == record["final_metrics"]["pr_auc"]
    proc = _demo(tmp_path / "b", table, "--rounds", "1", "--metric", "loss", url=mosquitto.url)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads((tmp_path / "b" / "run.json").read_text())
    assert record["metric"] == "loss" and record["higher_is_better"] is False


def test_an_unknown_metric_is_one_line_and_exit_78(tmp_path: Path, table: Path) -> None:
    proc = _demo(tmp_path, table, "--rounds", "1", "--metric", "rmse")
    assert proc.returncode == 78, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "'metric' = 'rmse'" in lines[0] and "f1_pos" in lines[0] and "pr_auc" in lines[0]
    assert not (tmp_path / "run.json").exists()
