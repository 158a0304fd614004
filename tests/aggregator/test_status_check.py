"""A gateway status out of bounds is refused with a reason before the aggregator acts on it."""

from __future__ import annotations

import pytest

from aggregator.status_check import MAX_ENTRIES, MAX_ROWS, MAX_TEXT, check_status
from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import Status

GOOD = Status(state="online", software="fedgate 1", rows=500, rows_new=62, rows_needed=100,
              last_eval={"mae": 0.2}, rejected={"stale_model": 1}, since=1.8e9, activity="ready")


def test_statuses_the_gateway_sends_pass() -> None:
    check_status(GOOD)
    check_status(Status(state="offline"))
    check_status(Status(state="online", rows_new=MAX_ROWS))


@pytest.mark.parametrize("bad", [
    Status(state="banana"),
    Status(state=""),
    Status(state="online", rows_new=2**62),
    Status(state="online", rows_new=-1),
    Status(state="online", rows=-5),
    Status(state="online", software="x" * (MAX_TEXT + 1)),
    Status(state="online", activity_detail="y" * (MAX_TEXT + 1)),
    Status(state="online", detail={"k": "v" * (MAX_TEXT + 1)}),
    Status(state="online", detail={str(i): "" for i in range(MAX_ENTRIES + 1)}),
    Status(state="online", last_eval={"mae": float("nan")}),
    Status(state="online", since=float("inf")),
    Status(state="online", epsilon=float("-inf")),
    Status(state="online", rejected={"x": -3}),
])
def test_out_of_bounds_status_is_refused_with_a_reason(bad: Status) -> None:
    with pytest.raises(RemoteProtocolError) as err:
        check_status(bad)
    assert err.value.reason == "bad_status"
