"""Atomic checkpoints of the aggregator's state on disk.

One file, ``checkpoint.npz``, holds the global weights, the server optimizer's arrays and
the JSON metadata (round, version, parent hash, ledgers...). It is written to a temporary
file, fsync'd, and renamed over the old one, then the folder is fsync'd: a crash at any
point leaves either the previous or the new checkpoint, never a torn one.

The round history (up to ``keep_history`` summaries) is not rewritten every round: each
entry is appended once to ``history.jsonl`` as ``{"n": number, "entry": {...}}`` and the
checkpoint names how many entries it covers (``history_count``). Reading back takes the
entries numbered up to that count (lines a crash left past it are dropped, a torn last line
is skipped); the journal is rewritten when it belongs to another state or has grown to
twice what is kept. Appends are not fsync'd: the history is what operators read, not what
a restart needs, and a killed process loses nothing (the kernel holds the write); a power
cut may lose the last entries, never the checkpoint. A checkpoint of the earlier layout
(the history inside its metadata) still loads.

Each committed model is also kept as ``models/v{version}.npz`` for deployment, roll-back
and audit (:func:`save_model`, written once the model is out); :func:`prune_models` keeps the newest ``keep`` of them plus any version still
named by the deployment state. A failed write raises ``OSError`` (a full disk): the caller
holds what depends on it and retries.
"""

from __future__ import annotations

import io
import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.rounds import Checkpoint

FILE = "checkpoint.npz"
JOURNAL = "history.jsonl"
# per state folder: (lines in the journal, newest entry number); read once per process
_journals: dict[Path, tuple[int, int]] = {}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pack(checkpoint: Checkpoint) -> bytes:
    arrays = {f"w_{i}": w for i, w in enumerate(checkpoint.weights)}
    arrays.update(checkpoint.arrays)
    arrays["meta"] = np.frombuffer(json.dumps(checkpoint.meta).encode(), dtype=np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool
    return buf.getvalue()


def _read_journal(directory: Path) -> list[tuple[int, dict[str, Any]]]:
    try:
        text = (directory / JOURNAL).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
            n, entry = int(record["n"]), record["entry"]
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line
        if isinstance(entry, dict):
            out.append((n, entry))
    return out


def _journal_lines(records: list[tuple[int, dict[str, Any]]]) -> str:
    return "".join(json.dumps({"n": n, "entry": e}, separators=(",", ":")) + "\n" for n, e in records)


def _append(path: Path, data: bytes) -> None:
    """Append ``data`` whole or not at all: a full disk leaves no half line behind."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except OSError:
            _journals.pop(path.parent, None)
            try:
                os.ftruncate(fd, size)
            except OSError:
                pass
            raise
    finally:
        os.close(fd)


def _save_history(directory: Path, history: list[dict[str, Any]], count: int) -> None:
    """Append the entries the journal lacks (numbered ``count - len(history) + 1 ..
    count``), or rewrite it when it is of another state or too long."""
    first = count - len(history) + 1
    known = _journals.get(directory)
    if known is None:
        records = _read_journal(directory)
        known = (len(records), max((n for n, _ in records), default=0))
    lines, newest = known
    numbered = list(zip(range(first, count + 1), history, strict=True))
    if newest > count or newest < first - 1 or lines >= 2 * len(history) + 16:
        _atomic_write(directory / JOURNAL, _journal_lines(numbered).encode())
        _journals[directory] = (len(numbered), count)
        return
    new = [(n, e) for n, e in numbered if n > newest]
    if new:
        _append(directory / JOURNAL, _journal_lines(new).encode())
    _journals[directory] = (lines + len(new), max(newest, count))


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    meta = dict(checkpoint.meta)
    history = meta.pop("history", [])
    count = int(meta.setdefault("history_count", len(history)))
    _save_history(directory, history, count)  # first: the checkpoint covers what it names
    _atomic_write(path, _pack(Checkpoint(checkpoint.weights, meta, checkpoint.arrays)))
    return path


def save_model(directory: Path, version: int, weights: list[np.ndarray]) -> Path:
    """``models/v{version}.npz`` (kept as it is when it exists). Written after the model
    and the next announcement are out: the checkpoint holds the same weights, so a crash
    before this write loses nothing (the restarted aggregator writes it)."""
    models = directory / "models"
    models.mkdir(parents=True, exist_ok=True)
    version_file = models / f"v{version}.npz"
    if not version_file.exists():
        buf = io.BytesIO()
        np.savez(buf, **{f"w_{i}": w for i, w in enumerate(weights)})  # type: ignore[arg-type]
        _atomic_write(version_file, buf.getvalue())
    return version_file


SUMMARY_SENT = "summary-sent"


def mark_summary_sent(directory: Path, lineage: str, round_: int) -> None:
    """Remember that round ``round_``'s summary went out (best effort, no fsync: after a
    power cut the restarted aggregator at worst publishes it once more)."""
    try:
        (directory / SUMMARY_SENT).write_text(f"{lineage} {round_}\n")
    except OSError:
        pass


def summary_sent(directory: Path, lineage: str) -> int:
    """The round of ``lineage`` whose summary went out last (-1: unknown)."""
    try:
        sent_lineage, round_ = (directory / SUMMARY_SENT).read_text().split()
        return int(round_) if sent_lineage == lineage else -1
    except (OSError, ValueError):
        return -1


def model_path(directory: Path, version: int) -> Path:
    return directory / "models" / f"v{version}.npz"


def load_model(directory: Path, version: int) -> list[np.ndarray] | None:
    """The weights of a kept version, or None when its file is gone."""
    path = model_path(directory, version)
    try:
        with np.load(path, allow_pickle=False) as data:
            n = sum(k.startswith("w_") for k in data.files)
            return [np.asarray(data[f"w_{i}"], np.float32) for i in range(n)]
    except (OSError, KeyError, ValueError):
        return None


def kept_versions(directory: Path) -> list[int]:
    out = []
    for path in (directory / "models").glob("v*.npz"):
        try:
            out.append(int(path.stem[1:]))
        except ValueError:
            continue
    return sorted(out)


def prune_models(directory: Path, keep: int, protect: set[int]) -> list[int]:
    """Delete all but the newest ``keep`` model files and the ``protect``ed versions."""
    versions = kept_versions(directory)
    newest = set(versions[-keep:]) if keep > 0 else set()
    removed = [v for v in versions if v not in newest and v not in protect]
    for v in removed:
        model_path(directory, v).unlink(missing_ok=True)
    return removed


def set_aside_models(directory: Path, lineage: str) -> Path | None:
    """Model files of an earlier lineage (its checkpoint was lost) move to
    ``lineages/before-LINEAGE/models``, its history journal beside them: version numbers
    start again in a new lineage."""
    models = directory / "models"
    if not models.is_dir() or not any(models.iterdir()):
        return None
    target = directory / "lineages" / f"before-{lineage}"
    target.mkdir(parents=True, exist_ok=True)
    models.rename(target / "models")
    if (directory / JOURNAL).exists():  # its round history goes with them
        (directory / JOURNAL).rename(target / JOURNAL)
        _journals.pop(directory, None)
    return target / "models"


class DamagedCheckpoint(Exception):
    """The checkpoint file cannot be read back (names the file and why)."""


def load(directory: Path) -> Checkpoint | None:
    path = directory / FILE
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(bytes(data["meta"]).decode())
            weights = [np.asarray(data[f"w_{i}"]) for i in range(sum(k.startswith("w_") for k in data.files))]
            arrays = {k: np.asarray(data[k]) for k in data.files if k.startswith("opt_")}
        for key in ("round", "version", "parent_hash"):
            meta[key]  # noqa: B018 - the fields a restore cannot do without
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise DamagedCheckpoint(f"{path}: {type(exc).__name__}: {exc}") from None
    _journals.pop(directory, None)  # the next save reads the journal afresh
    if "history" not in meta:  # the journal's entries up to the count the checkpoint names
        count = int(meta.get("history_count", 0))
        records = _read_journal(directory)
        entries = dict(r for r in records if r[0] <= count)
        meta["history"] = [entries[n] for n in sorted(entries)]
        meta["history_count"] = max(entries, default=0)  # numbering goes on after the newest kept
        if len(entries) < len(records):  # lines past the checkpoint: the next save rewrites
            _journals[directory] = (len(records), sys.maxsize)
    return Checkpoint(weights, meta, arrays)


class StateInUse(Exception):
    """Another process holds the state folder (names it and its pid)."""


class StateLock:
    """An exclusive lock on the state folder (``aggregator.lock``, an fcntl lock the kernel
    drops when its process dies): one aggregator per state, and nobody archives the state
    of a running aggregator."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "aggregator.lock"
        self._fd: int | None = None

    def acquire(self) -> StateLock:
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StateInUse(f"{self.path.parent} is in use by another aggregator (pid {holder})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
