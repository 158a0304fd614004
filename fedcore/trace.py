"""Timestamps of a round's steps, for measuring where its time goes (``[state] trace``).

A service with ``[state] trace = true`` appends one JSON line per step to
``state_dir/trace.jsonl``: ``{"t": unix seconds, "step": NAME, ...fields}`` - the round, the
version, the device, the sender's envelope timestamp where a message arrived. On one machine
the services share a clock, so a hop is the receiver's ``t`` minus the sender's; across
machines only the durations within one service are meaningful. ``bench/bench_latency.py``
joins the files into a per-step budget. Off by default: :class:`NoTrace` costs one call.

Steps (gateway): ``announcement_received``, ``train_start``, ``train_end``,
``update_published``, ``model_received``, ``model_installed``, ``evaluated``,
``served``. Steps (aggregator): ``round_published``, ``update_received``,
``fused``, ``checkpoint_saved``, ``model_published``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Protocol


class Tracer(Protocol):
    def mark(self, step: str, **fields: Any) -> None: ...

    def close(self) -> None: ...


class NoTrace:
    def mark(self, step: str, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass


class FileTrace:
    """Appends step lines to ``path``; a write that fails stops the trace, not the service."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: Any = open(path, "a", encoding="utf-8", buffering=1)  # a line at a time

    def mark(self, step: str, **fields: Any) -> None:
        if self._file is None:
            return
        try:
            self._file.write(json.dumps({"t": time.time(), "step": step, **fields}) + "\n")
        except OSError:
            self._file = None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def tracer(enabled: bool, state_dir: Path) -> Tracer:
    return FileTrace(state_dir / "trace.jsonl") if enabled else NoTrace()
