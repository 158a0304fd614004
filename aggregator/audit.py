"""The aggregator's append-only, hash-chained audit log (JSON lines).

Theory of operation
-------------------
Each line is one entry ``{seq, ts, kind, ...fields, prev_hash, hash}``. ``hash`` is the
SHA-256 of the entry's canonical JSON without ``hash`` (keys sorted, no spaces, UTF-8, no
NaN), and ``prev_hash`` is the previous entry's ``hash`` (64 zeros for the first). So
editing an entry breaks its own hash; deleting, inserting or reordering entries breaks the
next entry's ``prev_hash``; re-hashing an edited entry moves the break to the next line.
What a chain alone cannot show is a cut at the end (the last entries removed, or the last
one edited and re-hashed): :func:`verify_chain` takes the head hash recorded elsewhere (for
instance in a published model commit) to close that gap.

Kinds in use: ``join``, ``rejection`` (needs ``reason``), ``quarantine``, ``release`` and
``model_commit``; other lower-case names are accepted, so a new event does not need a
change here.

:class:`AuditLog` is the one writer (the aggregator runtime): it opens the file in append
mode, writes each entry with one ``write`` and ``fsync``s before returning, so an entry the
caller has seen appended survives a power cut. On start it resumes the chain from the last
line; a last line that is torn or does not hash refuses to open (an ``AuditLogError``,
exit code 78) rather than silently starting a second chain: an operator must look.
This module does file I/O by design; it is kept to the log alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcore.errors import ConfigError

GENESIS = "0" * 64
KNOWN_KINDS = ("join", "rejection", "quarantine", "release", "model_commit")
REQUIRED_FIELDS = {"rejection": ("reason",)}
RESERVED = frozenset({"seq", "ts", "kind", "prev_hash", "hash"})
MAX_LINE = 1 << 20  # longest line verify_chain reads; an entry is a few hundred bytes
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


class AuditLogError(ConfigError):
    """The audit log on disk cannot be continued; names the file and the line."""

    def __init__(self, path: Path, line: int, problem: str) -> None:
        super().__init__(str(path), f"line {line}", "", problem)


def canonical(entry: dict[str, Any]) -> bytes:
    return json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def entry_hash(entry: dict[str, Any]) -> str:
    """SHA-256 (hex) of the entry's canonical JSON without its ``hash`` key."""
    return hashlib.sha256(canonical({k: v for k, v in entry.items() if k != "hash"})).hexdigest()


def _check_entry(entry: Any) -> str:
    """'' if ``entry`` is well formed and hashes right; else what is wrong."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    for key, kind in (("seq", int), ("ts", (int, float)), ("kind", str), ("prev_hash", str), ("hash", str)):
        if not isinstance(entry.get(key), kind) or isinstance(entry.get(key), bool):
            return f"missing or mistyped {key!r}"
    if entry_hash(entry) != entry["hash"]:
        return "hash does not match the entry (edited)"
    return ""


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    entries: int  # entries that verified before the first problem
    head: str  # hash of the last entry that verified (GENESIS if none)
    first_bad_line: int | None = None  # 1-based
    problem: str = ""


def _check_line(raw: bytes, prev: str, seq: int) -> tuple[str, dict[str, Any]]:
    """('' and the entry) if ``raw`` is the right next line after ``prev``/``seq``."""
    if not raw.endswith(b"\n"):
        return ("line too long" if len(raw) > MAX_LINE else "torn last line (no newline)"), {}
    try:
        entry = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return "not valid JSON", {}
    if problem := _check_entry(entry):
        return problem, {}
    if entry["prev_hash"] != prev:
        return "prev_hash does not match the line before (deleted, inserted or reordered)", {}
    if entry["seq"] != seq + 1:
        return f"seq {entry['seq']} follows {seq}", {}
    return "", entry


def verify_chain(path: str | Path, expected_head: str | None = None) -> VerifyResult:
    """Check every line's hash, sequence and link; the first bad line and why."""
    prev, seq, count = GENESIS, 0, 0
    with open(path, "rb") as f:
        while raw := f.readline(MAX_LINE + 1):
            problem, entry = _check_line(raw, prev, seq)
            if problem:
                return VerifyResult(False, count, prev, count + 1, problem)
            prev, seq, count = entry["hash"], entry["seq"], count + 1
    if expected_head is not None and prev != expected_head:
        problem = "head hash differs from the recorded one (truncated or rewritten end)"
        return VerifyResult(False, count, prev, None, problem)
    return VerifyResult(True, count, prev)


def _tail(path: Path) -> tuple[bytes, bool]:
    """The file's last line and whether it ends with a newline, reading only the tail."""
    with open(path, "rb") as f:
        pos = f.seek(0, os.SEEK_END)
        tail = b""
        while pos > 0 and tail.count(b"\n") < 2:
            step = min(8192, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
    terminated = tail.endswith(b"\n")
    body = tail[:-1] if terminated else tail
    return body.rsplit(b"\n", 1)[-1], terminated


def _count_lines(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(block.count(b"\n") for block in iter(lambda: f.read(1 << 16), b""))


class AuditLog:
    """Appends chained entries to ``path`` (created with mode 0640 if missing)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.seq, self.head = 0, GENESIS
        if self.path.exists() and self.path.stat().st_size > 0:
            self._resume(*_tail(self.path))
        created = not self.path.exists()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        if created:
            # make the new directory entry durable too, not only the file's contents
            dir_fd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _resume(self, raw: bytes, terminated: bool) -> None:
        def refuse(problem: str) -> AuditLogError:
            lines = _count_lines(self.path) + (0 if terminated else 1)
            return AuditLogError(self.path, lines, f"{problem}; inspect it with verify_chain")

        if not terminated:
            raise refuse("last entry is torn (no newline)")
        try:
            entry = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise refuse("last entry is not JSON") from None
        if problem := _check_entry(entry):
            raise refuse(f"last entry: {problem}")
        self.seq, self.head = int(entry["seq"]), str(entry["hash"])

    def append(self, kind: str, ts: float, **fields: Any) -> dict[str, Any]:
        """Write one entry, durably; returns it (with its ``seq`` and ``hash``)."""
        if not _KIND.match(kind):
            raise ValueError(f"audit kind {kind!r} must be a lower-case name")
        if clash := sorted(RESERVED & set(fields)):
            raise ValueError(f"audit field {clash[0]!r} is reserved")
        if missing := [f for f in REQUIRED_FIELDS.get(kind, ()) if f not in fields]:
            raise ValueError(f"audit {kind} entry needs {missing[0]!r}")
        entry: dict[str, Any] = {"seq": self.seq + 1, "ts": float(ts), "kind": kind, **fields}
        entry["prev_hash"] = self.head
        try:
            entry["hash"] = entry_hash(entry)
            line = canonical(entry) + b"\n"
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit {kind} entry is not plain JSON: {exc}") from None
        written = os.write(self._fd, line)
        if written != len(line):  # a short write on a full disk: the line is torn
            raise OSError(f"audit log {self.path}: wrote {written} of {len(line)} bytes")
        os.fsync(self._fd)
        self.seq, self.head = entry["seq"], entry["hash"]
        return entry

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
