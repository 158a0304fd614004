"""Register decoding: Modbus words to engineering values, and read planning. Pure code.

Theory of operation
-------------------
A Modbus device exposes 16-bit registers (holding, input) and single bits (coils, discrete
inputs). A signal occupies one register (u16, i16) or two (u32, i32, f32). Vendors disagree
on the order of the four bytes of a 32-bit value, so every signal names it with the usual
letters, where ``A`` is the most significant byte of the value as it is meant to be read:

=======  ==========================  ==========================================
order    bytes on the wire (reg0,1)  who does this
=======  ==========================  ==========================================
ABCD     A B | C D                   Modbus default ("big endian"), most PLCs
CDAB     C D | A B                   word-swapped (many energy meters, Schneider)
BADC     B A | D C                   byte-swapped words
DCBA     D C | B A                   fully little endian
=======  ==========================  ==========================================

For 16-bit types only the byte swap matters (``ABCD``/``CDAB`` read ``A B``;
``BADC``/``DCBA`` read ``B A``).

The engineering value is ``raw * scale + offset``. Bits decode to 0.0 / 1.0.

Reads are planned once at load: signals of one function whose registers are close together
are fetched with one request (at most 125 registers or 2000 bits, the Modbus PDU limits),
which is what makes polling 50 devices cheap. Nothing here touches a clock or a socket.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from fedcore.errors import LocalProtocolError, RemoteProtocolError


class Function(enum.Enum):
    """The four Modbus data tables."""

    HOLDING = "holding"  # FC 3, 16-bit read/write
    INPUT = "input"  # FC 4, 16-bit read-only
    COIL = "coil"  # FC 1, bit read/write
    DISCRETE = "discrete"  # FC 2, bit read-only

    @property
    def is_bit(self) -> bool:
        return self in (Function.COIL, Function.DISCRETE)


class DataType(enum.Enum):
    U16 = "u16"
    I16 = "i16"
    U32 = "u32"
    I32 = "i32"
    F32 = "f32"
    BOOL = "bool"  # the only type for coils and discrete inputs

    @property
    def words(self) -> int:
        """How many 16-bit registers (or bits, for BOOL) one value occupies."""
        return 2 if self in (DataType.U32, DataType.I32, DataType.F32) else 1


WORD_ORDERS = ("ABCD", "CDAB", "BADC", "DCBA")
_STRUCT = {
    DataType.U16: ">H",
    DataType.I16: ">h",
    DataType.U32: ">I",
    DataType.I32: ">i",
    DataType.F32: ">f",
}
# Modbus PDU limits: a read returns at most 125 registers or 2000 bits.
MAX_REGISTERS_PER_READ = 125
MAX_BITS_PER_READ = 2000


@dataclass(frozen=True, slots=True)
class Encoding:
    """Where a signal lives on the device and how its words become a value."""

    function: Function
    address: int
    dtype: DataType
    order: str = "ABCD"
    scale: float = 1.0
    offset: float = 0.0

    @property
    def count(self) -> int:
        return self.dtype.words

    @property
    def end(self) -> int:
        """One past the last register (or bit) address this signal occupies."""
        return self.address + self.count


def _wire_to_canonical(raw: bytes, order: str) -> bytes:
    """Reorder the bytes read off the wire into ``A B C D`` (most significant first)."""
    if order not in WORD_ORDERS:
        raise LocalProtocolError(f"unknown word order {order!r}")
    if len(raw) == 2:
        return raw[::-1] if order in ("BADC", "DCBA") else raw
    if order == "ABCD":
        return raw
    if order == "CDAB":
        return raw[2:4] + raw[0:2]
    if order == "BADC":
        return bytes((raw[1], raw[0], raw[3], raw[2]))
    return raw[::-1]  # DCBA


def words_to_bytes(words: Sequence[int]) -> bytes:
    """Registers as they travel on the wire: each word big-endian (Modbus framing)."""
    for w in words:
        if not 0 <= w <= 0xFFFF:
            raise RemoteProtocolError("bad_register", f"register value {w} is not 16-bit")
    return b"".join(w.to_bytes(2, "big") for w in words)


def decode_raw(words: Sequence[int], dtype: DataType, order: str = "ABCD") -> int | float:
    """The raw number (before scale/offset) held in ``words``."""
    if dtype is DataType.BOOL:
        raise LocalProtocolError("BOOL values come from bit reads, not registers")
    if len(words) != dtype.words:
        raise RemoteProtocolError(
            "short_read", f"{dtype.value} needs {dtype.words} registers, got {len(words)}"
        )
    canonical = _wire_to_canonical(words_to_bytes(words), order)
    value: int | float = struct.unpack(_STRUCT[dtype], canonical)[0]
    return value


def encode_raw(value: int | float, dtype: DataType, order: str = "ABCD") -> list[int]:
    """Inverse of :func:`decode_raw`: the registers a device holds for ``value``."""
    if dtype is DataType.BOOL:
        raise LocalProtocolError("BOOL values are bits, not registers")
    if dtype is DataType.F32:
        canonical = struct.pack(">f", float(value))
    else:
        try:
            canonical = struct.pack(_STRUCT[dtype], int(value))
        except struct.error as exc:
            raise LocalProtocolError(f"{value!r} does not fit {dtype.value}") from exc
    # Every order is its own inverse, so the same shuffle maps canonical -> wire.
    wire = _wire_to_canonical(canonical, order)
    return [int.from_bytes(wire[i : i + 2], "big") for i in range(0, len(wire), 2)]


def engineering_value(raw: int | float | bool, enc: Encoding) -> float:
    return float(raw) * enc.scale + enc.offset


def raw_from_engineering(value: float, enc: Encoding) -> int | float:
    """For the simulator: the raw number that decodes to ``value`` (rounded for ints)."""
    raw = (value - enc.offset) / enc.scale
    return raw if enc.dtype is DataType.F32 else int(round(raw))


@dataclass(frozen=True, slots=True)
class ReadBlock:
    """One Modbus request covering several signals: ``count`` registers/bits from ``address``."""

    function: Function
    address: int
    count: int
    members: tuple[int, ...]  # indexes into the signal list given to plan_reads


def plan_reads(encodings: Sequence[Encoding], max_gap: int = 8) -> tuple[ReadBlock, ...]:
    """Group signals into as few requests as the PDU limits allow.

    Two signals share a request when they use the same function and the hole between them
    is at most ``max_gap`` addresses (reading a few unused registers is cheaper than a
    round trip; set ``max_gap = 0`` for devices that reject reads of undefined registers).
    """
    blocks: list[ReadBlock] = []
    order = sorted(
        range(len(encodings)), key=lambda i: (encodings[i].function.value, encodings[i].address)
    )
    current: list[int] = []
    for i in order:
        enc = encodings[i]
        if current:
            first, last_end = encodings[current[0]], max(encodings[j].end for j in current)
            limit = MAX_BITS_PER_READ if enc.function.is_bit else MAX_REGISTERS_PER_READ
            if (
                enc.function is first.function
                and enc.address - last_end <= max_gap
                and max(last_end, enc.end) - first.address <= limit
            ):
                current.append(i)
                continue
            blocks.append(_block(encodings, current))
        current = [i]
    if current:
        blocks.append(_block(encodings, current))
    return tuple(blocks)


def _block(encodings: Sequence[Encoding], members: list[int]) -> ReadBlock:
    start = min(encodings[i].address for i in members)
    end = max(encodings[i].end for i in members)
    return ReadBlock(encodings[members[0]].function, start, end - start, tuple(members))


def decode_block(
    block: ReadBlock, encodings: Sequence[Encoding], data: Sequence[int] | Sequence[bool]
) -> dict[int, float]:
    """Engineering values of every member of ``block`` from the registers/bits it read."""
    if len(data) < block.count:
        raise RemoteProtocolError(
            "short_read", f"asked {block.count} values at {block.address}, got {len(data)}"
        )
    values: dict[int, float] = {}
    for i in block.members:
        enc = encodings[i]
        lo = enc.address - block.address
        if block.function.is_bit:
            values[i] = engineering_value(bool(data[lo]), enc)
        else:
            words = [int(w) for w in data[lo : lo + enc.count]]
            values[i] = engineering_value(decode_raw(words, enc.dtype, enc.order), enc)
    return values
