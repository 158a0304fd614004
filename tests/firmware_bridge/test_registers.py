"""Byte-level decoding tables for every type and word order, and read planning."""

from __future__ import annotations

import math

import pytest

from fedcore.errors import RemoteProtocolError
from firmware_bridge.registers import (
    DataType,
    Encoding,
    Function,
    decode_block,
    decode_raw,
    encode_raw,
    plan_reads,
    words_to_bytes,
)

# (type, order, registers as read off the wire, expected raw value)
TABLE = [
    (DataType.U16, "ABCD", [0x1234], 0x1234),
    (DataType.U16, "CDAB", [0x1234], 0x1234),
    (DataType.U16, "BADC", [0x1234], 0x3412),
    (DataType.U16, "DCBA", [0x1234], 0x3412),
    (DataType.U16, "ABCD", [0xFFFF], 65535),
    (DataType.I16, "ABCD", [0xFFFF], -1),
    (DataType.I16, "ABCD", [0x8000], -32768),
    (DataType.I16, "BADC", [0x0080], -32768),
    (DataType.I16, "ABCD", [0x7FFF], 32767),
    (DataType.U32, "ABCD", [0x1234, 0x5678], 0x12345678),
    (DataType.U32, "CDAB", [0x5678, 0x1234], 0x12345678),
    (DataType.U32, "BADC", [0x3412, 0x7856], 0x12345678),
    (DataType.U32, "DCBA", [0x7856, 0x3412], 0x12345678),
    (DataType.U32, "ABCD", [0xFFFF, 0xFFFF], 4294967295),
    (DataType.I32, "ABCD", [0xFFFF, 0xFFFE], -2),
    (DataType.I32, "CDAB", [0xFFFE, 0xFFFF], -2),
    (DataType.I32, "ABCD", [0x8000, 0x0000], -(2**31)),
    (DataType.I32, "DCBA", [0x0000, 0x0080], -(2**31)),
    # 1.0f = 3F 80 00 00 ; -2.5f = C0 20 00 00 ; 123.456f = 42 F6 E9 79
    (DataType.F32, "ABCD", [0x3F80, 0x0000], 1.0),
    (DataType.F32, "CDAB", [0x0000, 0x3F80], 1.0),
    (DataType.F32, "BADC", [0x803F, 0x0000], 1.0),
    (DataType.F32, "DCBA", [0x0000, 0x803F], 1.0),
    (DataType.F32, "ABCD", [0xC020, 0x0000], -2.5),
    (DataType.F32, "ABCD", [0x42F6, 0xE979], 123.45600128173828),
    (DataType.F32, "CDAB", [0xE979, 0x42F6], 123.45600128173828),
    (DataType.F32, "BADC", [0xF642, 0x79E9], 123.45600128173828),
    (DataType.F32, "DCBA", [0x79E9, 0xF642], 123.45600128173828),
]


@pytest.mark.parametrize(("dtype", "order", "words", "expected"), TABLE)
def test_decode_table(dtype: DataType, order: str, words: list[int], expected: float) -> None:
    assert decode_raw(words, dtype, order) == expected


@pytest.mark.parametrize(("dtype", "order", "words", "expected"), TABLE)
def test_encode_is_inverse(dtype: DataType, order: str, words: list[int], expected: float) -> None:
    assert encode_raw(expected, dtype, order) == words


def test_wire_bytes_are_big_endian_words() -> None:
    assert words_to_bytes([0x1234, 0xABCD]) == b"\x12\x34\xab\xcd"


def test_nan_survives_f32() -> None:
    assert math.isnan(decode_raw([0x7FC0, 0x0000], DataType.F32, "ABCD"))


def test_peer_errors_are_remote() -> None:
    with pytest.raises(RemoteProtocolError) as short:
        decode_raw([0x1234], DataType.F32)
    assert short.value.reason == "short_read"
    with pytest.raises(RemoteProtocolError) as big:
        decode_raw([0x10000], DataType.U16)
    assert big.value.reason == "bad_register"


def test_scale_offset_and_planning() -> None:
    encs = [
        Encoding(Function.HOLDING, 10, DataType.I16, scale=0.1, offset=-40.0),
        Encoding(Function.HOLDING, 11, DataType.F32, order="CDAB"),
        Encoding(Function.HOLDING, 30, DataType.U16),  # gap of 17 > 8: separate read
        Encoding(Function.COIL, 0, DataType.BOOL),
        Encoding(Function.INPUT, 11, DataType.U16),  # other table: separate read
    ]
    blocks = plan_reads(encs, max_gap=8)
    shape = sorted((b.function.value, b.address, b.count, b.members) for b in blocks)
    assert shape == [
        ("coil", 0, 1, (3,)),
        ("holding", 10, 3, (0, 1)),
        ("holding", 30, 1, (2,)),
        ("input", 11, 1, (4,)),
    ]
    holding = next(b for b in blocks if b.address == 10)
    values = decode_block(holding, encs, [650] + encode_raw(2.5, DataType.F32, "CDAB"))
    assert values == {0: pytest.approx(25.0), 1: 2.5}
    assert plan_reads(encs, max_gap=20)[1].members == (0, 1, 2)


def test_planning_respects_pdu_limit() -> None:
    encs = [Encoding(Function.INPUT, 2 * i, DataType.U32) for i in range(100)]  # 200 registers
    blocks = plan_reads(encs)
    assert [b.count for b in blocks] == [124, 76]
    assert sum(len(b.members) for b in blocks) == 100
