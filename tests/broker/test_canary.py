"""Staged rollout for real: each new model first runs on a canary gateway, which judges it
against the incumbent on its own holdout rows; the aggregator promotes or rolls back and
audits the decision. Real processes on Mosquitto (the demo's configs, synthetic data)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.demo_configs import DemoOptions, write_configs
from fedgate.processes import ProcessGroup, fedgate_argv, wait_for

pytestmark = [pytest.mark.broker]

DEPLOY = """
[deploy]
policy = "canary"
canary_fraction = 0.34
canary_timeout_s = 120  # generous: a loaded CI machine must not turn a slow report into a roll-back
"""


def test_each_new_model_is_judged_on_a_canary_before_the_fleet_runs_it(tmp_path: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    dataset = load_dataset("synthetic", gateways=3, max_rows_per_unit=300)
    options = DemoOptions(dataset="synthetic", gateways=3, rounds=3, fleet="c", task="canary",
                          extra_aggregator_toml=DEPLOY)
    files = write_configs(tmp_path, mosquitto.url, options, dataset, default_spec(dataset),
                          default_train_config(dataset))
    with ProcessGroup(tmp_path / "logs") as group:
        for name, path in files.edges.items():
            group.start(f"edge-{name}", fedgate_argv("edge", "run", "-c", str(path)))
        group.start("aggregator", fedgate_argv("aggregator", "run", "-c", str(files.aggregator)))
        decisions = wait_for("three canary decisions", lambda: _decisions(tmp_path, 3), 400,
                             group=group, alive=["aggregator"])
        log = group.children["aggregator"].output()
    # one canary of three gateways judged each new version against the incumbent
    assert [d["candidate"] for d in decisions] == [1, 2, 3]
    for d in decisions:
        assert d["reports"] == 1 and d["rows"] > 0 and 0 <= d["candidate_metric"] <= 1  # accuracy
        assert ("promoted" if d["promoted"] else "rolled back") in log
    assert log.count("canary report from") >= 3
    listed = json.loads(subprocess.run(
        [sys.executable, "-m", "fedgate", "model", "list", "-c", str(files.aggregator), "--json"],
        capture_output=True, text=True, timeout=60, check=True).stdout)
    reasons = [h["reason"] for h in listed["deployments"]]
    assert reasons[0] == "lineage started" and any(r.startswith("candidate 1 on 1 canaries") for r in reasons)
    assert listed["deployment_mode"] == "version"  # a canary policy always names the version run
    edges = "".join(group.children[f"edge-{n}"].output() for n in files.edges)
    assert "canary report: version 1" in edges and "(candidate)" in edges


def _decisions(tmp_path: Path, n: int) -> list[dict[str, object]] | None:
    audit = tmp_path / "aggregator-state" / "audit.jsonl"
    if not audit.exists():
        return None
    entries = [json.loads(line) for line in audit.read_text().splitlines() if line.strip()]
    found = [e for e in entries if e.get("kind") == "deployment_decision"]
    return found if len(found) >= n else None
