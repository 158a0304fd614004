"""Operator commands through the aggregator's state folder (files only, no broker)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from aggregator import commands


def test_submit_take_answer_wait_round_trip(tmp_path: Path) -> None:
    ident = commands.submit(tmp_path, {"command": "deploy", "version": 7})
    assert commands.take_pending(tmp_path) == [(ident, {"command": "deploy", "version": 7})]
    assert commands.take_pending(tmp_path) == []  # taken once
    commands.answer(tmp_path, ident, True, "version 7 deployed (record 3)")
    result = commands.wait_result(tmp_path, ident, timeout=1.0)
    assert result == {"ok": True, "message": "version 7 deployed (record 3)"}
    # the answer is consumed by whoever waited for it
    assert commands.wait_result(tmp_path, ident, timeout=0.05) is None
    assert list((tmp_path / "commands").rglob("*.json")) == []


def test_the_caller_waits_for_an_answer_written_later(tmp_path: Path) -> None:
    ident = commands.submit(tmp_path, {"command": "release", "device": "gw3"})

    def aggregator_turn() -> None:
        time.sleep(0.2)
        for taken, command in commands.take_pending(tmp_path):
            commands.answer(tmp_path, taken, False, f"{command['device']} is not quarantined")

    worker = threading.Thread(target=aggregator_turn)
    worker.start()
    try:
        result = commands.wait_result(tmp_path, ident, timeout=5.0)
    finally:
        worker.join()
    assert result == {"ok": False, "message": "gw3 is not quarantined"}


def test_commands_are_taken_oldest_first(tmp_path: Path) -> None:
    idents = [commands.submit(tmp_path, {"command": "rollback", "n": i}) for i in range(5)]
    taken = commands.take_pending(tmp_path)
    assert [ident for ident, _ in taken] == idents
    assert [command["n"] for _, command in taken] == list(range(5))


def test_a_command_nobody_answers_times_out(tmp_path: Path) -> None:
    ident = commands.submit(tmp_path, {"command": "rollback"})
    started = time.monotonic()
    assert commands.wait_result(tmp_path, ident, timeout=0.3) is None
    assert 0.3 <= time.monotonic() - started < 2.0
    assert (tmp_path / "commands" / f"{ident}.json").is_file()  # still queued


def test_an_unknown_command_is_refused_before_it_is_queued(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown command 'reboot'"):
        commands.submit(tmp_path, {"command": "reboot"})
    assert commands.take_pending(tmp_path) == []


@pytest.mark.parametrize("content", [b"{not json", json.dumps(["deploy", 3]).encode(), b"",
                                     b"\xff\xfe not utf-8"])
def test_a_malformed_command_file_is_taken_and_answered_as_refused(tmp_path: Path,
                                                                   content: bytes) -> None:
    folder = tmp_path / "commands"
    folder.mkdir()
    (folder / "bad.json").write_bytes(content)
    (taken,) = commands.take_pending(tmp_path)
    assert taken == ("bad", {})
    assert not (folder / "bad.json").exists()
    assert commands.take_pending(tmp_path) == []  # not taken again on the next turn
    # the aggregator refuses an empty command and says so to whoever submitted it
    commands.answer(tmp_path, "bad", False, "unknown command None")
    assert commands.wait_result(tmp_path, "bad", timeout=1.0) == {
        "ok": False, "message": "unknown command None"}


def test_half_written_files_are_not_taken(tmp_path: Path) -> None:
    folder = tmp_path / "commands"
    folder.mkdir()
    (folder / ".123-4.tmp").write_text('{"command": "dep', "utf-8")
    assert commands.take_pending(tmp_path) == []
    assert (folder / ".123-4.tmp").exists()


def test_no_folder_means_no_commands(tmp_path: Path) -> None:
    assert commands.take_pending(tmp_path / "missing") == []
