"""When the next round may start: a pure function of the clock and the fleet's new rows.

``[schedule]`` in the aggregator config (all optional; without it a round follows the
previous one at once):

- ``interval_s``: at least this long between the starts of two rounds;
- ``windows``: allowed times of day, e.g. ``["22:00-06:00"]`` (quiet hours; a window may
  wrap past midnight), in ``timezone`` (an IANA name, default UTC);
- ``min_new_rows``: the online gateways together must hold at least this many training
  rows that no round has used yet (they report it in their status), so a plant that
  stopped producing does not retrain on the same rows.

:func:`next_round` answers whether a round may start now and, if not, why (the operator
reads it in ``fedgate status``) and when to look again.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

_WINDOW = re.compile(r"^([01]?[0-9]|2[0-3]):([0-5][0-9])-([01]?[0-9]|2[0-4]):([0-5][0-9])$")
DAY_MINUTES = 24 * 60


@dataclass(frozen=True, slots=True)
class Schedule:
    interval_s: float = 0.0
    windows: tuple[tuple[int, int], ...] = ()  # (start, end) minutes after midnight
    timezone: str = "UTC"
    min_new_rows: int = 0

    @property
    def active(self) -> bool:
        return bool(self.interval_s or self.windows or self.min_new_rows)


def parse_window(text: str) -> tuple[int, int]:
    """``"22:00-06:00"`` -> (1320, 360); raises ValueError."""
    match = _WINDOW.match(text.strip()) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"window {text!r}: write HH:MM-HH:MM, e.g. 22:00-06:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end > DAY_MINUTES or start == end:
        raise ValueError(f"window {text!r} is empty or past 24:00")
    return start, end


def check_timezone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown timezone {name!r} (an IANA name such as Europe/Paris)") from None


@dataclass(frozen=True, slots=True)
class Verdict:
    start: bool
    waiting_for: str = ""  # why not, for the operator
    check_at: float = 0.0  # when the answer can change by the clock alone (0: on new rows)


def _in_window(minute: int, window: tuple[int, int]) -> bool:
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


def _allowed(ts: float, windows: tuple[tuple[int, int], ...], zone: ZoneInfo) -> bool:
    local = dt.datetime.fromtimestamp(ts, zone)
    return any(_in_window(local.hour * 60 + local.minute, w) for w in windows)


def _next_opening(now: float, windows: tuple[tuple[int, int], ...], zone: ZoneInfo) -> float:
    """The first window start after ``now``, placed on each date's own wall clock: counting
    minutes from now would be an hour off across a DST change (a 23- or 25-hour day)."""
    today = dt.datetime.fromtimestamp(now, zone).date()
    openings = []
    for days in range(3):
        day = today + dt.timedelta(days=days)
        for start, _ in windows:
            ts = dt.datetime(day.year, day.month, day.day, start // 60, start % 60,
                             tzinfo=zone).timestamp()
            if ts > now and _allowed(ts, windows, zone):  # a start in a skipped hour is later
                openings.append(ts)
    return min(openings, default=now + DAY_MINUTES * 60)


def next_round(schedule: Schedule, now: float, last_start: float, new_rows: int) -> Verdict:
    """May a round start at ``now``? ``last_start``: when the previous round started (0:
    none yet); ``new_rows``: the online gateways' unused training rows."""
    if schedule.interval_s and last_start and now < last_start + schedule.interval_s:
        at = last_start + schedule.interval_s
        return Verdict(False, f"interval: next round at {_clock(at, schedule)}", at)
    if schedule.windows:
        zone = check_timezone(schedule.timezone)
        if not _allowed(now, schedule.windows, zone):
            at = max(now + 1.0, _next_opening(now, schedule.windows, zone))
            return Verdict(False, f"outside the allowed windows: next at {_clock(at, schedule)}", at)
    if schedule.min_new_rows and new_rows < schedule.min_new_rows:
        return Verdict(False, f"new rows: {new_rows} of {schedule.min_new_rows}")
    return Verdict(True)


def _clock(ts: float, schedule: Schedule) -> str:
    local = dt.datetime.fromtimestamp(ts, check_timezone(schedule.timezone))
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")
