"""The gateway's on-disk spool: signed messages that the broker has not acknowledged yet.

Theory of operation
-------------------
One append-only file, ``state_dir/spool.bin``, holds two kinds of record:

- an *entry*: a message as it goes on the wire (topic, QoS, retain flag, the signed payload)
  plus what an operator needs to read the spool (kind, round, message id) and a sequence
  number;
- a *done* mark: the sequence number of an entry that left the spool, and why (``""``:
  the broker acknowledged it; otherwise the reason it was dropped).

Each record is framed as ``length (u32 LE) | CRC-32 of the body (u32 LE) | body`` with a
msgpack body. An entry is written and fsync'd before the message is handed to the
transport, so a power cut after a publish can never lose it. A cut in the middle of a write
leaves a torn last record: on load a record that runs past the end of the file, fails its
CRC or does not decode ends the file there; it is cut off, counted (``torn``) and logged.
Done marks are not fsync'd: losing one in a power cut only means the message is sent once
more, and the receiver drops it by its message id.

The spool is bounded by entries and by bytes (the entries' record sizes). Adding an entry
to a full spool drops the oldest ones with the reason ``full``; an entry larger than the
whole byte bound is not spooled at all (``too_large``). When the file holds more than twice
the live bytes (and at least ``COMPACT_MIN_BYTES``) it is rewritten with only the live
entries (temporary file, fsync, rename); an empty spool truncates the file.

This module owns the file format; :mod:`edge.outbox` decides when entries are added and
when they leave. A disk that refuses a write raises OSError to the caller.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections import Counter, OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import msgspec

log = logging.getLogger("fedgate.edge.spool")

FILE = "spool.bin"
HEADER = struct.Struct("<II")  # body length, CRC-32 of the body
MAX_RECORD = 64 * 1024 * 1024  # a longer length field is damage, not a record
COMPACT_MIN_BYTES = 1024 * 1024
_ENTRY, _DONE = 0, 1
ACKNOWLEDGED = ""  # the done reason of an entry the broker has


@dataclass(frozen=True, slots=True)
class Entry:
    """One spooled message. ``payload`` is the signed envelope exactly as published, so a
    resend carries the same message id and signature."""

    seq: int
    topic: str
    qos: int
    retain: bool
    kind: str
    round: int
    message_id: str
    payload: bytes

    @property
    def size(self) -> int:
        """Bytes this entry takes in the file (what the byte bound counts)."""
        return len(encode_entry(self))


@dataclass(frozen=True, slots=True)
class Loaded:
    """What a spool file holds: live entries in order, the next sequence number, how many
    bytes of torn or damaged tail were found (0: none) and the file's valid length."""

    entries: list[Entry]
    next_seq: int
    torn_bytes: int
    valid_length: int


# ------------------------------------------------------------------ format (pure)


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body), zlib.crc32(body)) + body


def encode_entry(e: Entry) -> bytes:
    return _frame(msgspec.msgpack.encode(
        [_ENTRY, e.seq, e.topic, e.qos, e.retain, e.kind, e.round, e.message_id, e.payload]))


def encode_done(seq: int, reason: str) -> bytes:
    return _frame(msgspec.msgpack.encode([_DONE, seq, reason]))


def _records(data: bytes) -> Iterator[tuple[int, list[object]]]:
    """(end offset, body) of each intact record, up to the first damaged one."""
    offset = 0
    while offset + HEADER.size <= len(data):
        length, crc = HEADER.unpack_from(data, offset)
        start, end = offset + HEADER.size, offset + HEADER.size + length
        if length > MAX_RECORD or end > len(data):
            return
        body = data[start:end]
        if zlib.crc32(body) != crc:
            return
        try:
            fields = msgspec.msgpack.decode(body)
        except msgspec.DecodeError:
            return
        if not isinstance(fields, list) or len(fields) < 2:
            return
        yield end, fields
        offset = end


def _entry(fields: list[object]) -> Entry | None:
    try:
        _, seq, topic, qos, retain, kind, rnd, message_id, payload = fields
    except ValueError:
        return None
    if not (isinstance(seq, int) and isinstance(topic, str) and isinstance(qos, int)
            and isinstance(retain, bool) and isinstance(kind, str) and isinstance(rnd, int)
            and isinstance(message_id, str) and isinstance(payload, bytes)):
        return None
    return Entry(seq, topic, qos, retain, kind, rnd, message_id, payload)


def parse(data: bytes) -> Loaded:
    """The live entries of a spool file's bytes (entries without a done mark), in order."""
    live: OrderedDict[int, Entry] = OrderedDict()
    valid, next_seq = 0, 1
    for end, fields in _records(data):
        tag, seq = fields[0], fields[1]
        if not isinstance(seq, int):
            break
        if tag == _ENTRY:
            entry = _entry(fields)
            if entry is None:
                break
            live[seq] = entry
        elif tag == _DONE:
            live.pop(seq, None)
        else:
            break
        next_seq = max(next_seq, seq + 1)
        valid = end
    return Loaded(list(live.values()), next_seq, len(data) - valid, valid)


def read(state_dir: Path) -> Loaded:
    """What ``state_dir``'s spool holds, without changing the file (for tools and tests)."""
    try:
        data = (state_dir / FILE).read_bytes()
    except FileNotFoundError:
        data = b""
    return parse(data)


# ------------------------------------------------------------------ the file


class Spool:
    """The spool file of one gateway. ``dropped`` counts entries that left without an
    acknowledgement, by reason (``full``, ``too_large``, ``torn``, ``refused``...)."""

    def __init__(self, state_dir: Path, max_entries: int, max_bytes: int) -> None:
        self.path = state_dir / FILE
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.dropped: Counter[str] = Counter()
        self._live: OrderedDict[int, Entry] = OrderedDict()
        self._sizes: dict[int, int] = {}
        self._live_bytes = 0
        self._file_bytes = 0
        state_dir.mkdir(parents=True, exist_ok=True)
        loaded = read(state_dir)
        self._next_seq = loaded.next_seq
        if loaded.torn_bytes:
            log.warning("%s: cut off %d bytes of a torn or damaged last record (a write "
                        "interrupted by a power cut or crash; that message was never sent)",
                        self.path, loaded.torn_bytes)
            self.dropped["torn"] += 1
            with open(self.path, "r+b") as f:
                f.truncate(loaded.valid_length)
                f.flush()
                os.fsync(f.fileno())
        self._file_bytes = loaded.valid_length
        for entry in loaded.entries:
            self._keep(entry, entry.size)
        self._fd = _open_append(self.path)
        if self._live:
            log.info("%s: %d unsent (%d bytes) from before the restart",
                     self.path, len(self._live), self.live_bytes)
        for entry in self._make_room():  # the bounds may have shrunk since they were written
            log.warning("%s: dropped message %s (%s, round %d): over [spool] bounds",
                        self.path, entry.message_id, entry.kind, entry.round)
        self._maybe_compact()

    # ---- reading

    def __len__(self) -> int:
        return len(self._live)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._live.values()))

    def __contains__(self, seq: int) -> bool:
        return seq in self._live

    @property
    def live_bytes(self) -> int:
        return self._live_bytes

    def find(self, topic: str, message_id: str) -> Entry | None:
        for entry in self._live.values():
            if entry.topic == topic and entry.message_id == message_id:
                return entry
        return None

    # ---- writing

    def add(self, topic: str, payload: bytes, qos: int, retain: bool, kind: str, rnd: int,
            message_id: str) -> tuple[Entry | None, list[Entry]]:
        """Write a new entry, fsync'd. Returns it (None: larger than the byte bound, not
        spooled) and the older entries dropped to make room. Raises OSError."""
        entry = Entry(self._next_seq, topic, qos, retain, kind, rnd, message_id, payload)
        record = encode_entry(entry)
        if len(record) > self.max_bytes:
            self.dropped["too_large"] += 1
            return None, []
        self._write(record, sync=True)
        self._next_seq += 1
        self._keep(entry, len(record))
        return entry, self._make_room()

    def remove(self, seq: int, reason: str = ACKNOWLEDGED) -> Entry | None:
        """The entry left: acknowledged (``reason`` ""), or dropped for ``reason``."""
        entry = self._live.pop(seq, None)
        if entry is None:
            return None
        self._live_bytes -= self._sizes.pop(seq, 0)
        if reason != ACKNOWLEDGED:
            self.dropped[reason] += 1
        try:
            self._write(encode_done(seq, reason), sync=False)
            self._maybe_compact()
        except OSError as exc:  # the entry is sent once more after a restart: harmless
            log.warning("%s: cannot mark message %d done: %s", self.path, seq, exc.strerror or exc)
        return entry

    def close(self) -> None:
        os.close(self._fd)

    def _keep(self, entry: Entry, size: int) -> None:
        self._live[entry.seq] = entry
        self._sizes[entry.seq] = size
        self._live_bytes += size

    def _make_room(self) -> list[Entry]:
        """Drop the oldest entries until the bounds hold (the newest always fits: it is
        no larger than the byte bound and there is room for at least one entry)."""
        out = []
        while len(self._live) > 1 and (len(self._live) > self.max_entries
                                       or self._live_bytes > self.max_bytes):
            entry = self.remove(next(iter(self._live)), "full")
            if entry is not None:
                out.append(entry)
        return out

    def _write(self, record: bytes, sync: bool) -> None:
        """Append ``record`` whole or not at all: a write cut short (a full disk) is cut
        off again, so the next record does not follow a torn one (which would end the file
        there on the next load)."""
        try:
            view, written = memoryview(record), 0
            while written < len(record):
                written += os.write(self._fd, view[written:])
            if sync:
                os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self._file_bytes)
            except OSError:
                pass
            raise
        self._file_bytes += len(record)

    def _maybe_compact(self) -> None:
        if not self._live:
            if self._file_bytes:
                os.ftruncate(self._fd, 0)
                self._file_bytes = 0
            return
        live = self.live_bytes
        if self._file_bytes < COMPACT_MIN_BYTES or self._file_bytes <= 2 * live:
            return
        tmp = self.path.with_name(FILE + ".tmp")
        try:
            with open(tmp, "wb") as f:
                for entry in self._live.values():
                    f.write(encode_entry(entry))
                f.flush()
                os.fsync(f.fileno())
        except OSError as exc:  # a full disk: the longer file is still right; try later
            log.warning("%s: cannot compact: %s", self.path, exc.strerror or exc)
            tmp.unlink(missing_ok=True)
            return
        os.replace(tmp, self.path)
        _fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = _open_append(self.path)
        self._file_bytes = live


def _open_append(path: Path) -> int:
    """Unbuffered: every write reaches the OS at once, so a failed one is known at once."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)


def _fsync_dir(path: Path) -> None:
    """Make a rename durable (POSIX: the directory entry is data of the directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
