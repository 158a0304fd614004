"""Any unit name from a user's table maps to a distinct, valid gateway id."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from fedcore.protocol.topics import check_name
from fedgate.demo_configs import device_id


def test_valid_unit_names_keep_their_name() -> None:
    assert device_id("R80711") == "gw-R80711"
    assert device_id("line_2.a-b") == "gw-line_2.a-b"


def test_other_names_get_their_valid_characters_and_a_hash() -> None:
    ids = [device_id(u) for u in ("Line 1/A", "Line 1-A", "Linie #2", "ü", "..", "a" * 200)]
    for ident in ids:
        check_name(ident, "device")
    assert len(set(ids)) == len(ids)
    assert ids[0].startswith("gw-Line-1-A-") and ids[0] != "gw-Line-1-A"


@given(st.lists(st.text(min_size=1, max_size=80), min_size=1, max_size=20, unique=True))
def test_every_unit_name_gives_a_distinct_valid_id(units: list[str]) -> None:
    ids = [device_id(u) for u in units]
    for ident in ids:
        check_name(ident, "device")
    assert len(set(ids)) == len(ids)
