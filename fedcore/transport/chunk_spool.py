"""A folder of files behind :class:`fedcore.protocol.chunks.ChunkStore`: assemblies survive restarts.

Each assembly is two files in the spool folder: ``KEY.part``, the message's bytes at their
offsets (created at full size, sparse until the chunks arrive), and ``KEY.manifest``, the
record that lets :meth:`Assembler.restore` find it again after a restart. The manifest is
written (atomically: write, then rename) before any chunk, so a ``.part`` without one is an
unfinished create and is deleted on the next start. Keys are hex digests made by the
assembler, so no peer-chosen name reaches the file system.

The folder's size is bounded by the assembler's ``ChunkLimits.max_total_bytes`` (it never
reserves more) plus the finished message being taken.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

_KEY = re.compile(r"^[0-9a-f]{1,64}\Z")


class FileChunkStore:
    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        for part in self.folder.glob("*.part"):
            if not part.with_suffix(".manifest").exists():
                part.unlink(missing_ok=True)  # a create interrupted before its record was saved
        for tmp in self.folder.glob("*.tmp"):
            tmp.unlink(missing_ok=True)

    def _path(self, key: str, suffix: str) -> Path:
        if not _KEY.match(key):
            raise ValueError(f"not a spool key: {key!r}")
        return self.folder / f"{key}{suffix}"

    def create(self, key: str, size: int, record: bytes) -> None:
        part = self._path(key, ".part")
        with open(part, "wb") as f:
            f.truncate(size)  # sparse: disk fills as chunks arrive
        tmp = self._path(key, ".tmp")
        tmp.write_bytes(record)
        os.replace(tmp, self._path(key, ".manifest"))

    def write(self, key: str, offset: int, data: bytes) -> None:
        with open(self._path(key, ".part"), "r+b") as f:
            f.seek(offset)
            f.write(data)

    def read(self, key: str, offset: int, length: int) -> bytes:
        with open(self._path(key, ".part"), "rb") as f:
            f.seek(offset)
            return f.read(length)

    def records(self) -> list[tuple[str, bytes]]:
        out = []
        for path in sorted(self.folder.glob("*.manifest")):
            key = path.stem
            if _KEY.match(key) and self._path(key, ".part").exists():
                out.append((key, path.read_bytes()))
            else:
                path.unlink(missing_ok=True)
        return out

    def remove(self, key: str) -> None:
        self._path(key, ".manifest").unlink(missing_ok=True)
        self._path(key, ".part").unlink(missing_ok=True)
