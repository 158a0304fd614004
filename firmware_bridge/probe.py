"""`fedgate bridge probe`: live decoded values of every signal, for the field engineer.

Runs the same pollers as the service (so what probe shows is what the bridge will store)
with a sink that keeps nothing, and prints one line per signal: device, signal, value with
unit, age of the last good value, error count and the last error. :func:`render` is pure
(takes the health counters and ``now``); :func:`probe` owns the clock and the terminal.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

from firmware_bridge.config import BridgeConfig
from firmware_bridge.modbus import DeviceHealth
from firmware_bridge.runtime import Bridge, NullSink

_CLEAR = "\x1b[H\x1b[J"  # cursor home + clear screen: refresh in place


def render(config: BridgeConfig, health: Mapping[str, DeviceHealth], now: float) -> str:
    """A table of every signal; ``now`` is wall time (for ages)."""
    lines = [
        f"{'device':<14} {'signal':<14} {'value':>16} {'unit':<6} {'age':>7} {'errors':>6}  last error"
    ]
    for dev in config.devices:
        h = health[dev.name]
        state = "" if h.up else f"  [DOWN, retry #{h.failures}]"
        for sig in dev.signals:
            s = h.signals[sig.name]
            value = "-" if s.last_value is None else _fmt(s.last_value)
            age = "-" if s.last_good is None else f"{max(0.0, now - s.last_good):.1f}s"
            lines.append(
                f"{dev.name:<14} {sig.name:<14} {value:>16} {sig.unit:<6} {age:>7} {s.errors:>6}  {s.last_error}{state}"
            )
    return "\n".join(lines)


def _fmt(v: float) -> str:
    # Registers hold at most float32 precision (7 digits); counters print whole.
    return f"{v:.0f}" if v.is_integer() and abs(v) < 1e15 else f"{v:.7g}"


def _settled(config: BridgeConfig, health: Mapping[str, DeviceHealth]) -> bool:
    """Every signal has either a value or an error: a snapshot says something about each."""
    return all(
        s.last_good is not None or s.errors > 0
        for dev in config.devices
        for s in health[dev.name].signals.values()
    )


def probe(
    config: BridgeConfig,
    once: bool = False,
    refresh: float = 1.0,
    out: TextIO | None = None,
    stop: threading.Event | None = None,
) -> int:
    """Print live values; with ``once``, one snapshot after every signal answered or failed.

    Returns 0 when every signal has a value, 69 otherwise (unavailable; for scripts)."""
    out = out or sys.stdout
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # the table shows the errors
    bridge = Bridge(config, sink=NullSink())
    stop = stop or threading.Event()
    bridge.start()
    try:
        if once:
            worst = max(d.timeout * (d.retries + 1) for d in config.devices)
            deadline = (
                time.monotonic()
                + worst
                + max(s.period for d in config.devices for s in d.signals)
                + 1.0
            )
            while time.monotonic() < deadline and not _settled(config, bridge.health()):
                time.sleep(0.05)
            out.write(render(config, bridge.health(), time.time()) + "\n")
        else:
            while not stop.wait(refresh):
                bridge.pump()
                out.write(_CLEAR + render(config, bridge.health(), time.time()) + "\n")
                out.flush()
    except KeyboardInterrupt:
        pass
    finally:
        bridge.stop()
    good = all(
        s.last_good is not None for h in bridge.health().values() for s in h.signals.values()
    )
    return 0 if good else 69  # a device that does not answer: unavailable (EX_UNAVAILABLE)
