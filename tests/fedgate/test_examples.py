"""The example configs in examples/ are valid, as `fedgate config check` sees them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))


def test_there_is_an_example_per_service() -> None:
    assert {p.name for p in EXAMPLES} == {"aggregator.toml", "edge.toml", "bridge.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_config_is_valid(path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "fedgate", "config", "check", str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "valid" in proc.stdout


def test_a_broken_example_is_explained(tmp_path: Path) -> None:
    bad = tmp_path / "aggregator.toml"
    bad.write_text(EXAMPLES[0].read_text().replace("rounds = 100", "rounds = -1"))
    proc = subprocess.run([sys.executable, "-m", "fedgate", "config", "check", str(bad)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 78
    assert "rounds.rounds" in proc.stdout + proc.stderr and "-1" in proc.stdout + proc.stderr
