"""Smoke run of bench/bench_spool.py: it runs as documented and prints its table. No
timings are asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_spool_bench_runs(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_spool.py"), "--sizes", "100",
                          "2000", "--count", "5", "--dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=120, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    rows = [line for line in out.splitlines() if line.startswith("| 100 ") or line.startswith("| 2,000 ")]
    assert len(rows) == 2
    assert "load of a full spool (1000 entries of 4,096 bytes)" in out
    assert not (tmp_path / "s100" / "spool.bin").read_bytes()  # everything was acknowledged
