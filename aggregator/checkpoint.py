"""Atomic checkpoints of the aggregator's state on disk.

One file, ``checkpoint.npz``, holds the global weights, the server optimizer's arrays and
the JSON metadata (round, version, parent hash, history, ledgers...). It is written to a
temporary file, fsync'd, and renamed over the old one, then the folder is fsync'd: a crash
at any point leaves either the previous or the new checkpoint, never a torn one. Each
committed model is also kept as ``models/v{version}.npz`` for roll-back and audit.
"""

from __future__ import annotations

import io
import json
import os
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


def load(directory: Path) -> Checkpoint | None:
    path = directory / FILE
    if not path.exists():
        return None
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(bytes(data["meta"]).decode())
        weights = [np.asarray(data[f"w_{i}"]) for i in range(sum(k.startswith("w_") for k in data.files))]
        arrays = {k: np.asarray(data[k]) for k in data.files if k.startswith("opt_")}
    return Checkpoint(weights, meta, arrays)
