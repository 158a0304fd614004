"""Line-oriented serial sensors: one text line per reading, CSV columns or key=value pairs.

Theory of operation
-------------------
Many cheap sensors (and Arduino-class converters) print a line per reading on a serial port,
either ``21.5,40.2,1013`` (CSV, the column names come from the config) or
``temp=21.5 hum=40.2`` (key=value, separated by spaces, commas or semicolons). The sensor
sets the pace; the bridge does not ask.

:func:`parse_line` is pure. :class:`LinePoller` drains the port at each poll (the smallest
signal period of the device), keeps the *last* complete line that parsed — older lines in
the buffer were superseded — and stamps its values with the wall time of the poll. Lines
that do not parse are counted as errors on the signals they should have carried; a port that
stays silent longer than ``timeout`` counts a "no data" error; a port that cannot be opened
or fails is backed off like a Modbus device (same capped, jittered schedule).

Ports are opened with :func:`serial.serial_for_url`, so ``/dev/ttyUSB0``, ``loop://`` and
``socket://host:port`` all work.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable
from typing import Any

from fedcore.errors import RemoteProtocolError
from fedcore.samples import Sample
from firmware_bridge.config import DeviceSpec, LineLink
from firmware_bridge.modbus import DeviceHealth, SignalHealth, backoff_delay

MAX_LINE = 4096  # a sensor that never sends a newline must not grow the buffer forever
_KV_SPLIT = re.compile(r"[\s,;]+")


def parse_line(line: str, link: LineLink) -> dict[str, float]:
    """Values by source name (CSV column or key); raises RemoteProtocolError if malformed."""
    text = line.strip()
    if not text:
        raise RemoteProtocolError("empty_line")
    out: dict[str, float] = {}
    if link.format == "csv":
        fields = [f.strip() for f in text.split(link.separator)]
        if len(fields) != len(link.columns):
            raise RemoteProtocolError(
                "bad_line", f"{len(fields)} fields, expected {len(link.columns)}: {text[:80]!r}"
            )
        for name, raw in zip(link.columns, fields, strict=True):
            out[name] = _number(raw, name)
        return out
    for item in _KV_SPLIT.split(text):
        if not item:
            continue
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise RemoteProtocolError("bad_line", f"{item!r} is not key=value")
        out[key] = _number(raw, key)
    return out


def _number(raw: str, name: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise RemoteProtocolError("bad_value", f"{name}={raw!r} is not a number") from None
    if math.isinf(value):
        raise RemoteProtocolError("bad_value", f"{name}={raw!r} is infinite")
    return value


class LinePoller:
    """Reads one line sensor; same interface as :class:`~firmware_bridge.modbus.ModbusPoller`."""

    def __init__(
        self,
        spec: DeviceSpec,
        rng: random.Random,
        start: float,
        opener: Callable[[LineLink, float], Any] | None = None,
    ) -> None:
        if not isinstance(spec.link, LineLink):
            raise TypeError("LinePoller needs a serial_lines device")
        self.spec = spec
        self.link: LineLink = spec.link
        self.rng = rng
        self.opener = opener or _open
        self.port: Any = None
        self.buffer = b""
        self.period = min(s.period for s in spec.signals)
        self.next_due = start
        self.last_line_at = start  # monotonic time a line last parsed
        self.health = DeviceHealth(signals={s.name: SignalHealth() for s in spec.signals})

    def due_at(self) -> float:
        return max(self.next_due, self.health.retry_at)

    def poll(
        self, mono: float, wall: float, clock: Callable[[], float] | None = None
    ) -> list[Sample]:
        if mono < self.due_at():
            return []
        nxt = self.next_due + self.period
        self.next_due = nxt if nxt > mono else mono + self.period
        try:
            if self.port is None:
                self.port = self.opener(self.link, self.spec.timeout)
                self.last_line_at = mono
            waiting = int(self.port.in_waiting)
            if waiting:
                self.buffer += self.port.read(waiting)
        except Exception as exc:  # pyserial raises SerialException and OSError alike
            self._down(mono, f"serial port: {exc}")
            return []
        self.health.up, self.health.failures, self.health.retry_at = True, 0, 0.0
        *lines, self.buffer = self.buffer.split(b"\n")
        if len(self.buffer) > MAX_LINE:
            self.buffer = b""
            self._error_all("line longer than 4096 bytes without a newline")
        values: dict[str, float] | None = None
        for raw in lines:
            try:
                values = parse_line(raw.decode("utf-8", "replace"), self.link)
            except RemoteProtocolError as exc:
                if exc.reason != "empty_line":
                    self._error_all(str(exc))
        if values is None:
            if mono - self.last_line_at > max(self.spec.timeout, self.period):
                self._error_all(f"no data for {mono - self.last_line_at:.1f} s")
                self.last_line_at = mono  # count once per timeout, not per poll
            return []
        self.last_line_at = mono
        stamp = clock() if clock is not None else wall
        out: list[Sample] = []
        for sig in self.spec.signals:
            h = self.health.signals[sig.name]
            raw_value = values.get(sig.source or sig.name)
            if raw_value is None:
                h.errors += 1
                h.last_error = f"'{sig.source}' missing from the line"
                continue
            value = raw_value * sig.scale + (sig.encoding.offset if sig.encoding else 0.0)
            h.reads += 1
            h.last_value, h.last_good = value, stamp
            out.append(Sample(self.spec.name, sig.name, stamp, value, sig.unit))
        return out

    def _error_all(self, why: str) -> None:
        for h in self.health.signals.values():
            h.errors += 1
            h.last_error = why

    def _down(self, mono: float, why: str) -> None:
        self.close()
        self.health.up = False
        self.health.failures += 1
        delay = backoff_delay(
            self.health.failures,
            self.spec.backoff_initial,
            self.spec.backoff_max,
            self.rng.random(),
        )
        self.health.retry_at = mono + delay
        self._error_all(why)

    def close(self) -> None:
        if self.port is not None:
            try:
                self.port.close()
            finally:
                self.port = None


def _open(link: LineLink, timeout: float) -> Any:
    import serial

    return serial.serial_for_url(link.port, baudrate=link.baudrate, timeout=timeout)
