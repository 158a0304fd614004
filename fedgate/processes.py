"""Services as child processes, owned by one object that stops them on every exit path.

:class:`ProcessGroup` starts commands (``fedgate ...``, ``mosquitto ...``) in their own
session with their output in a log file each, and stops every one of them - SIGTERM to the
child's whole process group, then SIGKILL after a grace period - when the ``with`` block
ends, whatever ended it. Tests and benchmarks use it so that no run leaves a service behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

T = TypeVar("T")


def fedgate_argv(*args: str) -> list[str]:
    """The installed `fedgate` command with ``args`` (falls back to ``python -m fedgate``)."""
    beside = Path(sys.executable).with_name("fedgate")
    found = str(beside) if beside.is_file() else shutil.which("fedgate")
    return [found, *args] if found else [sys.executable, "-m", "fedgate", *args]


@dataclass
class Child:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def running(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


class ProcessGroup:
    def __init__(self, logs: Path, grace_s: float = 10.0) -> None:
        self.logs = logs
        self.grace_s = grace_s
        self.children: dict[str, Child] = {}
        logs.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop_all()

    def start(self, name: str, argv: Sequence[str], cwd: Path | None = None,
              env: dict[str, str] | None = None) -> Child:
        if name in self.children and self.children[name].running:
            raise RuntimeError(f"{name} is already running")
        log = self.logs / f"{name}.log"
        out = open(log, "ab")
        try:
            proc = subprocess.Popen(list(argv), cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, env={**os.environ, **(env or {})})
        finally:
            out.close()
        child = Child(name, list(argv), proc, log)
        self.children[name] = child
        return child

    def stop(self, name: str, sig: int = signal.SIGTERM) -> int:
        """Signal one child and wait for it; returns its exit code."""
        child = self.children[name]
        if child.running:
            _signal_group(child, sig)
            try:
                child.proc.wait(self.grace_s)
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.proc.wait()
        return int(child.proc.returncode)

    def stop_all(self) -> None:
        for child in self.children.values():
            if child.running:
                _signal_group(child, signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        for child in self.children.values():
            try:
                child.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(child, signal.SIGKILL)
                child.proc.wait()

    def died(self) -> list[Child]:
        return [c for c in self.children.values() if not c.running]

    def logs_text(self, tail: int = 40) -> str:
        parts = []
        for child in self.children.values():
            lines = child.output().splitlines()[-tail:]
            parts.append(f"--- {child.name} ({'running' if child.running else f'exit {child.proc.returncode}'})")
            parts += lines
        return "\n".join(parts)


def _signal_group(child: Child, sig: int) -> None:
    """The child leads its own session: its own children (a shell's) get the signal too."""
    try:
        os.killpg(child.proc.pid, sig)
    except ProcessLookupError:
        pass


class WaitFailed(AssertionError):
    """What ``wait_for`` waited for did not happen (an assertion, for tests and benches)."""


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 0.5,
             group: ProcessGroup | None = None, alive: Sequence[str] = ()) -> T:
    """Poll ``probe`` until it returns something truthy; raise naming ``what`` (and the
    logs of ``group``) on timeout or when one of the ``alive`` children exits."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        dead = [n for n in alive if group is not None and not group.children[n].running]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {timeout:g} s"
            logs = f"\n{group.logs_text()}" if group is not None else ""
            raise WaitFailed(f"waiting for {what}: {why}{logs}")
        time.sleep(every)
