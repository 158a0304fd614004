"""Pure tests of aggregator.schedule: when the next round may start."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.schedule import Schedule, check_timezone, next_round, parse_window

BERLIN = ZoneInfo("Europe/Berlin")


def at(zone: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0,
       second: int = 0) -> float:
    return dt.datetime(year, month, day, hour, minute, second, tzinfo=zone).timestamp()


def local(ts: float, zone: ZoneInfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, zone)


def windowed(*windows: str, timezone: str = "UTC") -> Schedule:
    return Schedule(windows=tuple(parse_window(w) for w in windows), timezone=timezone)


# ---- no schedule, interval -------------------------------------------------------------------


def test_without_a_schedule_a_round_starts_at_once() -> None:
    assert not Schedule().active
    assert next_round(Schedule(), now=5.0, last_start=4.0, new_rows=0).start


def test_interval_counts_from_the_last_start() -> None:
    schedule = Schedule(interval_s=600)
    early = next_round(schedule, now=1599.0, last_start=1000.0, new_rows=0)
    assert not early.start
    assert early.check_at == 1600.0
    assert early.waiting_for.startswith("interval: next round at ")
    assert next_round(schedule, now=1600.0, last_start=1000.0, new_rows=0).start


def test_interval_does_not_hold_back_the_first_round() -> None:
    assert next_round(Schedule(interval_s=3600), now=10.0, last_start=0.0, new_rows=0).start


# ---- windows -----------------------------------------------------------------------------------


def test_a_window_that_wraps_past_midnight_allows_both_sides() -> None:
    schedule = windowed("22:00-06:00")
    utc = ZoneInfo("UTC")
    for hour, minute in ((22, 0), (23, 59), (0, 0), (3, 30), (5, 59)):
        assert next_round(schedule, at(utc, 2025, 6, 1, hour, minute), 0.0, 0).start, (hour, minute)
    for hour, minute in ((6, 0), (12, 0), (21, 59)):
        assert not next_round(schedule, at(utc, 2025, 6, 1, hour, minute), 0.0, 0).start, (hour, minute)


def test_outside_the_windows_check_at_is_the_next_opening() -> None:
    schedule = windowed("22:00-06:00", "12:30-13:00")
    utc = ZoneInfo("UTC")
    verdict = next_round(schedule, at(utc, 2025, 6, 1, 9, 15, 20), 0.0, 0)
    assert not verdict.start
    assert verdict.check_at == at(utc, 2025, 6, 1, 12, 30)
    assert "outside the allowed windows: next at 2025-06-01 12:30:00 UTC" == verdict.waiting_for
    after_lunch = next_round(schedule, at(utc, 2025, 6, 1, 13, 0), 0.0, 0)
    assert after_lunch.check_at == at(utc, 2025, 6, 1, 22, 0)
    assert next_round(schedule, after_lunch.check_at, 0.0, 0).start


def test_windows_are_read_on_the_named_timezones_clock() -> None:
    schedule = windowed("22:00-06:00", timezone="Europe/Berlin")
    summer_23h_berlin = at(BERLIN, 2025, 7, 1, 23, 0)  # 21:00 UTC
    assert next_round(schedule, summer_23h_berlin, 0.0, 0).start
    assert not next_round(windowed("22:00-06:00"), summer_23h_berlin, 0.0, 0).start


@pytest.mark.parametrize("day", [(2025, 3, 30), (2025, 10, 26)], ids=["spring_forward", "fall_back"])
def test_check_at_lands_inside_the_window_across_a_dst_change(day: tuple[int, int, int]) -> None:
    # 01:30 local on the night the clocks change (02:00 -> 03:00, or 03:00 -> 02:00)
    schedule = windowed("04:00-05:00", timezone="Europe/Berlin")
    now = at(BERLIN, *day, 1, 30)
    verdict = next_round(schedule, now, 0.0, 0)
    assert not verdict.start
    opening = at(BERLIN, *day, 4, 0)
    assert verdict.check_at == opening, local(verdict.check_at, BERLIN)
    assert next_round(schedule, verdict.check_at, 0.0, 0).start
    assert f"next at {local(opening, BERLIN):%Y-%m-%d %H:%M:%S %Z}" in verdict.waiting_for


def test_a_window_opening_in_the_skipped_hour_still_opens_that_day() -> None:
    # 02:30 does not exist in Berlin on 2025-03-30; the window is open from 03:00 on
    schedule = windowed("02:30-06:00", timezone="Europe/Berlin")
    verdict = next_round(schedule, at(BERLIN, 2025, 3, 30, 1, 0), 0.0, 0)
    assert not verdict.start
    assert local(verdict.check_at, BERLIN).date() == dt.date(2025, 3, 30)
    assert next_round(schedule, verdict.check_at, 0.0, 0).start


# Window edges kept out of 01:00-04:00 local: there the wall clock jumps on DST days, and the
# first allowed instant is no longer a window's wall-clock start.
EDGE_MINUTES = st.integers(0, 24 * 60 - 1).filter(lambda m: not 60 <= m <= 240)
ZONES = st.sampled_from(["UTC", "Europe/Berlin", "America/New_York", "Australia/Sydney", "Asia/Kolkata"])
UTC = ZoneInfo("UTC")
# clock changes in those zones in 2025: most draws land within a day and a half of one
CHANGES = [at(UTC, 2025, 3, 30, 1), at(UTC, 2025, 10, 26, 1), at(UTC, 2025, 3, 9, 7),
           at(UTC, 2025, 11, 2, 6), at(UTC, 2025, 4, 5, 16), at(UTC, 2025, 10, 4, 16)]
NOW = st.one_of(
    st.builds(lambda change, offset: int(change) + offset, st.sampled_from(CHANGES),
              st.integers(-36 * 3600, 36 * 3600)),
    st.integers(int(at(UTC, 2024, 1, 1)), int(at(UTC, 2026, 12, 31))),
)


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"


@settings(max_examples=150, deadline=None)
@given(zone=ZONES, starts=st.lists(EDGE_MINUTES, min_size=1, max_size=3),
       lengths=st.lists(st.integers(1, 600), min_size=3, max_size=3),
       now=NOW)
def test_check_at_is_the_first_allowed_minute(zone: str, starts: list[int], lengths: list[int],
                                              now: int) -> None:
    texts = []
    for start, length in zip(starts, lengths, strict=False):
        end = (start + length) % (24 * 60)
        if 60 <= end <= 240 or end == start:
            continue
        texts.append(f"{_hhmm(start)}-{_hhmm(end) if end else '24:00'}")
    if not texts:
        return
    schedule = windowed(*texts, timezone=zone)
    verdict = next_round(schedule, float(now), 0.0, 0)
    if verdict.start:
        return
    assert verdict.check_at > now
    assert next_round(schedule, verdict.check_at, 0.0, 0).start, (texts, local(verdict.check_at, ZoneInfo(zone)))
    # no window opened in between: every whole minute up to check_at is outside
    minute = (now // 60 + 1) * 60
    while minute < verdict.check_at - 1:
        assert not next_round(schedule, float(minute), 0.0, 0).start, local(minute, ZoneInfo(zone))
        minute += 60


# ---- new rows ----------------------------------------------------------------------------------


def test_min_new_rows_waits_for_the_fleets_new_rows() -> None:
    schedule = Schedule(min_new_rows=500)
    verdict = next_round(schedule, now=100.0, last_start=50.0, new_rows=120)
    assert not verdict.start
    assert verdict.waiting_for == "new rows: 120 of 500"
    assert verdict.check_at == 0.0  # only new rows can change the answer
    assert next_round(schedule, now=100.0, last_start=50.0, new_rows=500).start


def test_the_clock_is_checked_before_the_rows() -> None:
    schedule = Schedule(interval_s=60, min_new_rows=10)
    verdict = next_round(schedule, now=100.0, last_start=50.0, new_rows=0)
    assert verdict.waiting_for.startswith("interval") and verdict.check_at == 110.0
    assert next_round(schedule, now=110.0, last_start=50.0, new_rows=3).waiting_for == "new rows: 3 of 10"


# ---- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "minutes"), [
    ("22:00-06:00", (1320, 360)),
    ("00:00-24:00", (0, 1440)),
    (" 7:05-8:00 ", (425, 480)),
])
def test_parse_window(text: str, minutes: tuple[int, int]) -> None:
    assert parse_window(text) == minutes


@pytest.mark.parametrize("text", [
    "22:00", "22-06", "25:00-01:00", "24:00-01:00", "22:60-23:00", "22:00-24:30",
    "22:00-22:00", "", "noon-midnight",
])
def test_parse_window_refuses_bad_windows(text: str) -> None:
    with pytest.raises(ValueError, match="window"):
        parse_window(text)


def test_parse_window_refuses_a_non_string() -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_window(2200)  # type: ignore[arg-type]


def test_check_timezone() -> None:
    assert check_timezone("Europe/Paris") == ZoneInfo("Europe/Paris")
    for name in ("Mars/Olympus_Mons", "", "../etc/passwd"):
        with pytest.raises(ValueError, match="unknown timezone"):
            check_timezone(name)
