"""A full disk under the aggregator's state is reported and survived, not a crash loop.

The aggregator's state folder is a small tmpfs. After the first round a file fills it: the
next checkpoint cannot be written, so the aggregator holds the round (nothing that depends
on the checkpoint is published), logs the reason once, exports
``fedgate_state_write_failing 1`` and says so in the task state - and keeps running. Once
space is freed it writes the checkpoint and the run completes.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fedcore.datasets import default_spec, default_train_config, load_dataset
from fedgate.broker import free_port
from fedgate.demo_configs import DemoOptions, write_configs
from fedgate.processes import ProcessGroup, fedgate_argv, wait_for

from .test_aggregator_metrics import _try

pytestmark = [pytest.mark.broker, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs")]


@pytest.fixture
def small_disk(tmp_path: Path):  # type: ignore[no-untyped-def]
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_holds_the_round_and_the_run_resumes(tmp_path: Path, small_disk: Path, mosquitto) -> None:  # type: ignore[no-untyped-def]
    dataset = load_dataset("synthetic", gateways=1, max_rows_per_unit=100)
    options = DemoOptions(dataset="synthetic", gateways=1, rounds=3, fleet="m", task="disk")
    files = write_configs(tmp_path, mosquitto.url, options, dataset, default_spec(dataset),
                          default_train_config(dataset))
    port = free_port()
    text = files.aggregator.read_text().replace(str(tmp_path / "aggregator-state"), str(small_disk))
    text = text.replace("[state]\n", f"[state]\nmetrics_port = {port}\n")
    files.aggregator.write_text(text + "\n[schedule]\ninterval_s = 3\n")
    with ProcessGroup(tmp_path / "logs") as group:
        group.start("aggregator", fedgate_argv("aggregator", "run", "-c", str(files.aggregator)))
        for name, path in files.edges.items():
            group.start(f"edge-{name}", fedgate_argv("edge", "run", "-c", str(path)))
        wait_for("round 1", lambda: _try(port).get("fedgate_round") == 1, 60, group=group,
                 alive=["aggregator"])
        filler = _fill(small_disk)
        wait_for("the write failure", lambda: _try(port).get("fedgate_state_write_failing") == 1, 60,
                 group=group, alive=["aggregator"])
        log = group.children["aggregator"].output()
        assert "cannot write the checkpoint" in log and "No space left on device" in log, log
        assert log.count("cannot write the checkpoint") == 1  # said once, not every retry
        assert _try(port)["fedgate_round"] == 1  # held: no round committed without its checkpoint
        assert group.children["aggregator"].running
        filler.unlink()
        wait_for("the run to finish", lambda: _try(port).get('fedgate_phase{phase="finished"}') == 1,
                 90, group=group, alive=["aggregator"])
        assert _try(port)["fedgate_state_write_failing"] == 0
        assert "the checkpoint is written again" in group.children["aggregator"].output()
