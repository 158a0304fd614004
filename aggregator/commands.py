"""Operator commands to a running aggregator, through its state folder.

``fedgate model deploy|rollback`` and ``fedgate aggregator release`` run on the
aggregator's host with its config; they drop a command file into ``state_dir/commands``
(written atomically: temporary name, then rename) and wait for the answer the aggregator
writes to ``state_dir/commands/results/<id>.json``. The aggregator looks for commands
every loop turn (0.2 s), carries them out through its state machines - so a deployment is
a signed, sequenced record like any other - and answers ``{"ok": ..., "message": ...}``.
The folder's permissions are the access control: whoever may write the aggregator's state
may steer it, as with its config.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

COMMANDS = ("release", "deploy", "rollback")


def _folder(state_dir: Path) -> Path:
    return state_dir / "commands"


def submit(state_dir: Path, command: dict[str, Any]) -> str:
    """Queue ``command`` (``{"command": NAME, ...}``); returns its id. Run as root (an
    operator's sudo), the files are handed to the state folder's owner - the aggregator's
    user must be able to take them. Raises OSError when the folder is not writable."""
    if command.get("command") not in COMMANDS:
        raise ValueError(f"unknown command {command.get('command')!r}")
    folder = _folder(state_dir)
    folder.mkdir(parents=True, exist_ok=True)
    ident = f"{time.time_ns():x}-{os.getpid()}"
    tmp = folder / f".{ident}.tmp"
    tmp.write_text(json.dumps(command), "utf-8")
    _same_owner(state_dir, folder, tmp)
    os.replace(tmp, folder / f"{ident}.json")
    return ident


def _same_owner(state_dir: Path, *paths: Path) -> None:
    if os.geteuid() != 0:
        return
    owner = state_dir.stat()
    for path in paths:
        os.chown(path, owner.st_uid, owner.st_gid)


def wait_result(state_dir: Path, ident: str, timeout: float) -> dict[str, Any] | None:
    """The aggregator's answer, or None when none came within ``timeout`` seconds."""
    path = _folder(state_dir) / "results" / f"{ident}.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            result: dict[str, Any] = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            time.sleep(0.1)
            continue
        path.unlink(missing_ok=True)
        return result
    return None


def take_pending(state_dir: Path) -> list[tuple[str, dict[str, Any]]]:
    """Commands waiting for the aggregator, oldest first (their files are removed)."""
    folder = _folder(state_dir)
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text("utf-8"))
        except (OSError, ValueError):
            data = {}
        path.unlink(missing_ok=True)
        out.append((path.stem, data if isinstance(data, dict) else {}))
    return out


RESULTS_KEPT_S = 60.0  # answers nobody collected (the command timed out) are removed after this


def answer(state_dir: Path, ident: str, ok: bool, message: str, now: float | None = None) -> None:
    folder = _folder(state_dir) / "results"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{ident}.tmp"
    tmp.write_text(json.dumps({"ok": ok, "message": message}), "utf-8")
    os.replace(tmp, folder / f"{ident}.json")
    cut = (time.time() if now is None else now) - RESULTS_KEPT_S
    for old in folder.glob("*.json"):
        try:
            if old.stat().st_mtime < cut:
                old.unlink()
        except OSError:
            continue
