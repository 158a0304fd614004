"""A changed [model] against saved state: a one-line configuration error (exit 78) that says
how to start a new lineage, and `fedgate aggregator new-lineage` archives the old state."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from aggregator import checkpoint as checkpoints
from aggregator import rounds as sm
from aggregator.config import load_aggregator_config
from fedcore.learning.models import init_params

CONFIG = """
[task]
fleet = "f"
name = "t"
[broker]
url = "mqtt://127.0.0.1:9"
startup_timeout_s = 2
[model]
layer_sizes = {sizes}
scaling = "none"
[state]
dir = "state"
"""


def fedgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedgate", *args], capture_output=True,
                          text=True, timeout=60)


def test_a_changed_model_is_a_config_error_until_a_new_lineage(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(CONFIG.format(sizes="[5, 8, 1]"))
    config = load_aggregator_config(path)
    machine = sm.RoundStateMachine(config.rounds, config.spec,
                                   init_params(config.spec, np.random.default_rng(0)), random.Random(0))
    machine.handle(sm.Started(1e9))
    checkpoints.save(config.state_dir, machine.checkpoint())
    lineage = machine.lineage

    path.write_text(CONFIG.format(sizes="[5, 16, 1]"))
    done = fedgate("aggregator", "run", "-c", str(path))
    assert done.returncode == 78, done.stderr
    (line,) = done.stderr.strip().splitlines()  # one line, no traceback
    assert "model.layer_sizes" in line and "layer_sizes [5, 8, 1] -> [5, 16, 1]" in line
    assert f"fedgate aggregator new-lineage -c {path}" in line

    done = fedgate("aggregator", "new-lineage", "-c", str(path))
    assert done.returncode == 0 and "archived" in done.stdout
    assert (tmp_path / "state" / "lineages" / lineage / "checkpoint.npz").is_file()
    assert checkpoints.load(tmp_path / "state") is None
    # the config now starts a new lineage: it gets as far as the (absent) broker
    done = fedgate("aggregator", "run", "-c", str(path))
    assert done.returncode == 69, done.stderr


def test_a_damaged_checkpoint_is_a_config_error_and_can_be_set_aside(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(CONFIG.format(sizes="[5, 8, 1]"))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "checkpoint.npz").write_bytes(b"PK\x03\x04 torn by a power cut")
    done = fedgate("aggregator", "run", "-c", str(path))
    assert done.returncode == 78, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "checkpoint.npz" in line and "new-lineage" in line
    listed = fedgate("model", "list", "-c", str(path))
    assert listed.returncode == 78 and "damaged" in listed.stderr
    done = fedgate("aggregator", "new-lineage", "-c", str(path))
    assert done.returncode == 0
    (archived,) = (tmp_path / "state" / "lineages").glob("damaged-*/checkpoint.npz")
    assert archived.read_bytes().startswith(b"PK")


def test_the_state_of_a_running_aggregator_is_not_archived_or_shared(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text(CONFIG.format(sizes="[5, 8, 1]"))
    held = checkpoints.StateLock(tmp_path / "state").acquire()  # as a running aggregator holds it
    try:
        done = fedgate("aggregator", "new-lineage", "-c", str(path))
        assert done.returncode == 78 and "in use by another aggregator" in done.stderr
        assert "stop it first" in done.stderr
        done = fedgate("aggregator", "run", "-c", str(path))
        assert done.returncode == 78 and "in use by another aggregator" in done.stderr
    finally:
        held.release()
