"""aggregator.checkpoint on a real folder: the checkpoint file and the history journal."""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from aggregator import checkpoint as checkpoints
from aggregator.rounds import Checkpoint

WEIGHTS = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]


def entry(version: int) -> dict[str, object]:
    return {"round": version, "version": version, "participants": 3, "rows": 30,
            "metric": 1.0 / version, "wall_s": 0.1, "time": 1.7e9 + version}


def state_at(version: int, keep: int = 1000, first: int = 1) -> Checkpoint:
    history = [entry(v) for v in range(first, version + 1)][-keep:]
    meta = {"round": version + 1, "version": version, "parent_hash": "00", "history": history,
            "history_count": version - first + 1}
    return Checkpoint([w + version for w in WEIGHTS], meta, {"opt_m_0": np.zeros(2)})


def saved_meta(state: Path) -> dict[str, object]:
    with np.load(state / checkpoints.FILE, allow_pickle=False) as data:
        return json.loads(bytes(data["meta"]).decode())


def fresh_process() -> None:
    checkpoints._journals.clear()  # what a restart forgets


def test_each_round_appends_one_line_and_the_checkpoint_holds_no_history(tmp_path: Path) -> None:
    for version in range(1, 6):
        checkpoints.save(tmp_path, state_at(version))
    lines = (tmp_path / checkpoints.JOURNAL).read_text().splitlines()
    assert [json.loads(line)["n"] for line in lines] == [1, 2, 3, 4, 5]
    meta = saved_meta(tmp_path)
    assert "history" not in meta and meta["history_count"] == 5
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None
    assert loaded.meta["history"] == [entry(v) for v in range(1, 6)]
    np.testing.assert_array_equal(loaded.weights[0], WEIGHTS[0] + 5)


def test_the_checkpoint_stays_small_while_the_history_grows(tmp_path: Path) -> None:
    checkpoints.save(tmp_path, state_at(1))
    small = (tmp_path / checkpoints.FILE).stat().st_size
    for version in range(2, 1200):
        checkpoints.save(tmp_path, state_at(version, keep=1000))
    assert (tmp_path / checkpoints.FILE).stat().st_size < small + 64
    # rewritten when it reached twice what is kept: never more than that
    lines = (tmp_path / checkpoints.JOURNAL).read_text().splitlines()
    assert 1000 <= len(lines) <= 2 * 1000 + 16
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and loaded.meta["history"][-1] == entry(1199)
    assert [h["version"] for h in loaded.meta["history"]][-1000:] == list(range(200, 1200))


def test_lines_a_crash_left_past_the_checkpoint_are_dropped_and_rewritten(tmp_path: Path) -> None:
    for version in range(1, 4):
        checkpoints.save(tmp_path, state_at(version))
    # round 4's entry reached the journal, then the process died before its checkpoint
    with open(tmp_path / checkpoints.JOURNAL, "a") as f:
        f.write(json.dumps({"n": 4, "entry": entry(4)}) + "\n")
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and [h["version"] for h in loaded.meta["history"]] == [1, 2, 3]
    # the round is done again, with another outcome: the journal says that one
    redone = dict(entry(4), participants=2)
    state = state_at(4)
    state.meta["history"][-1] = redone
    checkpoints.save(tmp_path, state)
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and loaded.meta["history"][-1] == redone


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    for version in range(1, 4):
        checkpoints.save(tmp_path, state_at(version))
    with open(tmp_path / checkpoints.JOURNAL, "a") as f:
        f.write('{"n": 4, "entry": {"round"')
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and len(loaded.meta["history"]) == 3


def test_a_lost_journal_leaves_an_empty_history_and_numbering_goes_on(tmp_path: Path) -> None:
    for version in range(1, 4):
        checkpoints.save(tmp_path, state_at(version))
    (tmp_path / checkpoints.JOURNAL).unlink()
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and loaded.meta["history"] == [] and loaded.meta["history_count"] == 0
    state = state_at(4, first=4)  # what the restored machine holds one round later
    checkpoints.save(tmp_path, state)
    fresh_process()
    again = checkpoints.load(tmp_path)
    assert again is not None and again.meta["history"] == [entry(4)]


def test_a_checkpoint_with_the_history_inside_still_loads(tmp_path: Path) -> None:
    state = state_at(3)
    meta = {k: v for k, v in state.meta.items() if k != "history_count"}
    buf = io.BytesIO()
    np.savez(buf, w_0=WEIGHTS[0], w_1=WEIGHTS[1],
             meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8))
    (tmp_path / checkpoints.FILE).write_bytes(buf.getvalue())
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and loaded.meta["history"] == [entry(v) for v in (1, 2, 3)]
    # the next save moves it into the journal
    loaded.meta["history_count"] = 3
    checkpoints.save(tmp_path, loaded)
    assert len((tmp_path / checkpoints.JOURNAL).read_text().splitlines()) == 3


def test_a_damaged_checkpoint_is_named(tmp_path: Path) -> None:
    checkpoints.save(tmp_path, state_at(1))
    (tmp_path / checkpoints.FILE).write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(checkpoints.DamagedCheckpoint, match="checkpoint.npz"):
        checkpoints.load(tmp_path)
    assert not zipfile.is_zipfile(tmp_path / checkpoints.FILE)


def test_a_full_disk_mid_append_leaves_no_half_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for version in range(1, 4):
        checkpoints.save(tmp_path, state_at(version))
    before = (tmp_path / checkpoints.JOURNAL).read_bytes()
    real_write = os.write
    calls = {"n": 0}

    def half_then_full(fd: int, data: bytes | memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))  # part of the line lands
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(OSError):
        checkpoints.save(tmp_path, state_at(4))
    monkeypatch.setattr(os, "write", real_write)
    assert (tmp_path / checkpoints.JOURNAL).read_bytes() == before
    checkpoints.save(tmp_path, state_at(4))  # the held checkpoint, retried
    fresh_process()
    loaded = checkpoints.load(tmp_path)
    assert loaded is not None and [h["version"] for h in loaded.meta["history"]] == [1, 2, 3, 4]
