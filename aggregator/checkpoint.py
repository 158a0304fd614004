"""Atomic checkpoints of the aggregator's state on disk.

One file, ``checkpoint.npz``, holds the global weights, the server optimizer's arrays and
the JSON metadata (round, version, parent hash, bounded history, ledgers...). It is written
to a temporary file, fsync'd, and renamed over the old one, then the folder is fsync'd: a
crash at any point leaves either the previous or the new checkpoint, never a torn one.

Each committed model is also kept as ``models/v{version}.npz`` for deployment, roll-back
and audit; :func:`prune_models` keeps the newest ``keep`` of them plus any version still
named by the deployment state. A failed write raises ``OSError`` (a full disk): the caller
holds what depends on it and retries.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path

import numpy as np

from aggregator.rounds import Checkpoint

FILE = "checkpoint.npz"


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


def save(directory: Path, checkpoint: Checkpoint) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE
    _atomic_write(path, _pack(checkpoint))
    models = directory / "models"
    models.mkdir(exist_ok=True)
    version_file = models / f"v{checkpoint.meta['version']}.npz"
    if not version_file.exists():
        buf = io.BytesIO()
        np.savez(buf, **{f"w_{i}": w for i, w in enumerate(checkpoint.weights)})  # type: ignore[arg-type]
        _atomic_write(version_file, buf.getvalue())
    return path


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
    ``lineages/before-LINEAGE/models``: version numbers start again in a new lineage."""
    models = directory / "models"
    if not models.is_dir() or not any(models.iterdir()):
        return None
    target = directory / "lineages" / f"before-{lineage}"
    target.mkdir(parents=True, exist_ok=True)
    models.rename(target / "models")
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
