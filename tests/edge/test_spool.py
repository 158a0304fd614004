"""The spool file on its own: order, bounds, drops by reason, torn tails, reload."""

from __future__ import annotations

from pathlib import Path

from edge import spool as sp
from edge.spool import Spool

BIG = 1 << 30


def add(spool: Spool, n: int, size: int = 10, kind: str = "update") -> list[sp.Entry]:
    out = []
    for i in range(n):
        entry, _ = spool.add(f"fg/f/t/update/gw{i % 2}", bytes([i % 256]) * size, 1, False,
                             kind, i, f"id-{i}")
        assert entry is not None
        out.append(entry)
    return out


def test_entries_come_back_in_order_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, BIG)
    written = add(spool, 5)
    spool.close()
    again = Spool(tmp_path, 100, BIG)
    assert list(again) == written  # same topic, payload, kind, round, message id, order
    assert [e.message_id for e in again] == [f"id-{i}" for i in range(5)]
    more, _ = again.add("t/x", b"later", 1, True, "canary", 0, "id-later")
    assert more is not None and more.seq == written[-1].seq + 1  # numbers go on, not reused


def test_acknowledged_entries_stay_gone_after_a_restart(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, BIG)
    written = add(spool, 4)
    assert spool.remove(written[1].seq) == written[1]
    assert spool.remove(written[1].seq) is None  # a second PUBACK for it changes nothing
    spool.close()
    assert [e.message_id for e in Spool(tmp_path, 100, BIG)] == ["id-0", "id-2", "id-3"]
    assert sp.read(tmp_path).entries[0].message_id == "id-0"


def test_a_full_spool_drops_the_oldest_and_counts_it(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 3, BIG)
    written = add(spool, 3)
    entry, dropped = spool.add("t/x", b"new", 1, False, "update", 9, "id-new")
    assert dropped == [written[0]]
    assert [e.message_id for e in spool] == ["id-1", "id-2", "id-new"]
    assert spool.dropped == {"full": 1}
    spool.close()
    assert len(Spool(tmp_path, 3, BIG)) == 3  # the drop is on disk too


def test_the_byte_bound_counts_whole_records(tmp_path: Path) -> None:
    one = sp.Entry(1, "fg/f/t/update/gw0", 1, False, "update", 0, "id-0", b"\0" * 1000).size
    spool = Spool(tmp_path, 100, 3 * one + 10)
    add(spool, 5, size=1000)
    assert len(spool) == 3 and spool.live_bytes <= 3 * one + 10
    assert spool.dropped == {"full": 2}
    entry, dropped = spool.add("t/x", b"\0" * (4 * one), 1, False, "update", 9, "huge")
    assert entry is None and dropped == [] and len(spool) == 3  # larger than the bound
    assert spool.dropped["too_large"] == 1


def test_shrunk_bounds_apply_when_the_spool_is_loaded(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 10, BIG)
    add(spool, 6)
    spool.close()
    smaller = Spool(tmp_path, 2, BIG)
    assert [e.message_id for e in smaller] == ["id-4", "id-5"]
    assert smaller.dropped == {"full": 4}


def test_a_torn_last_record_is_cut_off_and_counted(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, BIG)
    add(spool, 3, size=200)
    spool.close()
    path = tmp_path / sp.FILE
    whole = path.read_bytes()
    path.write_bytes(whole[:-50])  # the power went off in the middle of the third write
    assert len(sp.read(tmp_path).entries) == 2
    assert path.read_bytes() == whole[:-50]  # read() changes nothing
    again = Spool(tmp_path, 100, BIG)
    assert [e.message_id for e in again] == ["id-0", "id-1"]
    assert again.dropped == {"torn": 1}
    third = sp.encode_entry(sp.Entry(3, "fg/f/t/update/gw0", 1, False, "update", 2, "id-2",
                                     bytes([2]) * 200))
    assert path.stat().st_size == len(whole) - len(third)  # the torn bytes are gone
    again.add("t/x", b"after", 1, False, "update", 7, "id-after")
    again.close()
    assert [e.message_id for e in Spool(tmp_path, 100, BIG)] == ["id-0", "id-1", "id-after"]


def test_a_damaged_record_ends_the_file_there(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, BIG)
    add(spool, 3, size=100)
    spool.close()
    path = tmp_path / sp.FILE
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a flipped bit in the last record's payload: its CRC fails
    path.write_bytes(bytes(data))
    again = Spool(tmp_path, 100, BIG)
    assert [e.message_id for e in again] == ["id-0", "id-1"] and again.dropped == {"torn": 1}
    path.write_bytes(b"\xff" * 7)  # not even a header
    assert len(Spool(tmp_path, 100, BIG)) == 0


def test_an_empty_spool_leaves_an_empty_file_and_dead_records_are_compacted(tmp_path: Path) -> None:
    path = tmp_path / sp.FILE
    spool = Spool(tmp_path, 10_000, BIG)
    for e in add(spool, 3):
        spool.remove(e.seq)
    assert path.stat().st_size == 0
    written = add(spool, 300, size=10_000)  # 3 MB, then all but the newest acknowledged
    for e in written[:-1]:
        spool.remove(e.seq)
    assert path.stat().st_size < 2 * sp.COMPACT_MIN_BYTES
    spool.close()
    assert [e.message_id for e in Spool(tmp_path, 10_000, BIG)] == [written[-1].message_id]


def test_find_names_a_spooled_message_by_topic_and_id(tmp_path: Path) -> None:
    spool = Spool(tmp_path, 100, BIG)
    written = add(spool, 2)
    assert spool.find(written[1].topic, "id-1") == written[1]
    assert spool.find(written[0].topic, "id-1") is None
