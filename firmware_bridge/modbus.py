"""Modbus TCP and RTU readers: polling schedule, retries, backoff and per-signal health.

Theory of operation
-------------------
A *link* is one connection: a TCP socket to ``host:port`` or one RS-485 serial port. Several
devices (unit ids) may share a link — a TCP gateway, or a multidrop RTU line — and are
polled in turn by one :class:`ModbusPoller` each, all driven by the link's worker thread
(see :mod:`firmware_bridge.runtime`). Links never share a thread, so a dead device can only
delay devices on its own wire, where the bus itself serialises every request anyway.

Each device's signals are grouped by poll period; each group is read with the few requests
that :func:`~firmware_bridge.registers.plan_reads` planned at load, and every value of one
request is stamped with the same time (the sample store rebuilds rows from that).

Failures, and what happens next:

- *transport* (refused, timed out, connection dropped): the request is retried up to
  ``retries`` times on a fresh connection; if it still fails the device is *down* and is
  not asked again until a backoff delay passes — ``backoff_initial * 2**(n-1)`` capped at
  ``backoff_max``, shrunk by up to 25 % of random jitter so that many gateways do not
  retry in lockstep. The first good answer resets it: the device *came back*.
- *Modbus exception* (the device answered "illegal address", "busy"...): the device is
  alive; only the signals of that request count an error. Busy (code 6) and gateway
  errors are retried; the others are configuration mistakes and are not.
- *bad data* (short reply): counted like an exception.

Every signal keeps counters and the wall time of its last good value
(:class:`SignalHealth`), which ``fedgate bridge probe`` prints.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fedcore.errors import RemoteProtocolError, TransportError
from fedcore.samples import Sample
from firmware_bridge.config import DeviceSpec, RtuLink, SignalSpec, TcpLink
from firmware_bridge.registers import Encoding, Function, ReadBlock, decode_block, plan_reads

# Exception codes worth asking again: 5 acknowledge, 6 busy, 10/11 gateway path/target.
RETRYABLE_CODES = frozenset({5, 6, 10, 11})
EXCEPTION_NAMES = {
    1: "illegal function",
    2: "illegal data address",
    3: "illegal data value",
    4: "device failure",
    5: "acknowledge",
    6: "device busy",
    8: "memory parity error",
    10: "gateway path unavailable",
    11: "gateway target failed to respond",
}


@dataclass
class SignalHealth:
    """Mutable counters of one signal, owned by its poller's thread (read by probe)."""

    reads: int = 0
    errors: int = 0
    last_value: float | None = None
    last_good: float | None = None  # wall time of the last good read
    last_error: str = ""


@dataclass
class DeviceHealth:
    up: bool = True
    failures: int = 0  # consecutive transport failures
    retry_at: float = 0.0  # monotonic time before which the device is not asked
    signals: dict[str, SignalHealth] = field(default_factory=dict)


class ModbusLink(Protocol):
    """One connection; ``read`` raises TransportError or RemoteProtocolError('modbus_exception')."""

    def read(
        self, function: Function, address: int, count: int, unit_id: int
    ) -> Sequence[int] | Sequence[bool]: ...

    def reset(self) -> None: ...

    def close(self) -> None: ...


def backoff_delay(failures: int, initial: float, cap: float, jitter: float) -> float:
    """Delay after ``failures`` consecutive failures; ``jitter`` in [0, 1) from the caller's RNG."""
    base = min(cap, initial * 2.0 ** max(0, failures - 1))
    return base * (1.0 - 0.25 * jitter)


class PymodbusLink:
    """A :class:`ModbusLink` over a pymodbus synchronous client (TCP or RTU)."""

    def __init__(self, link: TcpLink | RtuLink, timeout: float) -> None:
        from pymodbus.client import ModbusSerialClient, ModbusTcpClient
        from pymodbus.framer import FramerType

        self.client: ModbusTcpClient | ModbusSerialClient
        # pymodbus retries=0: retries and backoff are ours, so that they are counted.
        if isinstance(link, TcpLink):
            self.client = ModbusTcpClient(link.host, port=link.port, timeout=timeout, retries=0)
        else:
            self.client = ModbusSerialClient(
                link.port,
                framer=FramerType.RTU,
                baudrate=link.baudrate,
                parity=link.parity,
                stopbits=link.stopbits,
                bytesize=link.bytesize,
                timeout=timeout,
                retries=0,
            )
        self.name = link.bus

    def read(
        self, function: Function, address: int, count: int, unit_id: int
    ) -> Sequence[int] | Sequence[bool]:
        from pymodbus.exceptions import ModbusException

        calls = {
            Function.HOLDING: self.client.read_holding_registers,
            Function.INPUT: self.client.read_input_registers,
            Function.COIL: self.client.read_coils,
            Function.DISCRETE: self.client.read_discrete_inputs,
        }
        try:
            if not self.client.connected and not self.client.connect():
                raise TransportError(f"{self.name}: cannot connect")
            reply = calls[function](address, count=count, device_id=unit_id)
        except ModbusException as exc:
            self.reset()
            raise TransportError(f"{self.name}: {exc}") from exc
        except OSError as exc:
            self.reset()
            raise TransportError(f"{self.name}: {exc}") from exc
        if reply.isError():
            code = int(getattr(reply, "exception_code", 0))
            raise RemoteProtocolError(
                "modbus_exception", f"code {code} ({EXCEPTION_NAMES.get(code, 'unknown')})"
            )
        return list(reply.bits[:count]) if function.is_bit else list(reply.registers)

    def reset(self) -> None:
        self.client.close()

    def close(self) -> None:
        self.client.close()


@dataclass(frozen=True, slots=True)
class _Group:
    period: float
    signals: tuple[SignalSpec, ...]
    encodings: tuple[Encoding, ...]
    blocks: tuple[ReadBlock, ...]


class ModbusPoller:
    """Polls one Modbus device on a shared link. Time is passed in; nothing here sleeps."""

    def __init__(
        self, spec: DeviceSpec, link: ModbusLink, rng: random.Random, start: float
    ) -> None:
        self.spec = spec
        self.link = link
        self.rng = rng
        self.health = DeviceHealth(signals={s.name: SignalHealth() for s in spec.signals})
        by_period: dict[float, list[SignalSpec]] = {}
        for sig in spec.signals:
            by_period.setdefault(sig.period, []).append(sig)
        self.groups: list[_Group] = []
        for period, sigs in sorted(by_period.items()):
            encs = tuple(s.encoding for s in sigs if s.encoding is not None)
            self.groups.append(_Group(period, tuple(sigs), encs, plan_reads(encs, spec.max_gap)))
        self.next_due = [start for _ in self.groups]

    def due_at(self) -> float:
        """Monotonic time of the next read (later while the device is backing off)."""
        return max(min(self.next_due), self.health.retry_at)

    def poll(
        self, mono: float, wall: float, clock: Callable[[], float] | None = None
    ) -> list[Sample]:
        """Read every group that is due at ``mono``; returns good samples stamped ``wall``.

        ``clock`` (optional) gives the wall time after each request, so values are stamped
        when they arrived rather than when the poll began.
        """
        if mono < self.health.retry_at:
            return []
        out: list[Sample] = []
        for gi, group in enumerate(self.groups):
            if self.next_due[gi] > mono:
                continue
            # Schedule from the previous due time (no drift), skipping missed slots.
            nxt = self.next_due[gi] + group.period
            self.next_due[gi] = nxt if nxt > mono else mono + group.period
            for block in group.blocks:
                try:
                    values = self._read_block(block, group.encodings)
                except TransportError as exc:
                    self._device_down(group, block, str(exc), mono)
                    return out
                except RemoteProtocolError as exc:
                    self._block_failed(group, block, exc.detail or exc.reason)
                    continue
                stamp = clock() if clock is not None else wall
                self._device_up()
                for i, value in values.items():
                    sig = group.signals[i]
                    h = self.health.signals[sig.name]
                    h.reads += 1
                    h.last_value = value
                    h.last_good = stamp
                    out.append(Sample(self.spec.name, sig.name, stamp, value, sig.unit))
        return out

    def _read_block(self, block: ReadBlock, encodings: tuple[Encoding, ...]) -> dict[int, float]:
        last: Exception | None = None
        for _ in range(1 + self.spec.retries):
            try:
                data = self.link.read(block.function, block.address, block.count, self.spec.unit_id)
                return decode_block(block, encodings, data)
            except TransportError as exc:
                last = exc
            except RemoteProtocolError as exc:
                code = _code_of(exc)
                if code not in RETRYABLE_CODES:
                    raise
                last = exc
        assert last is not None
        raise last

    def _block_failed(self, group: _Group, block: ReadBlock, why: str) -> None:
        self._device_up()  # it answered, so it is alive
        for i in block.members:
            h = self.health.signals[group.signals[i].name]
            h.errors += 1
            h.last_error = why

    def _device_down(self, group: _Group, block: ReadBlock, why: str, mono: float) -> None:
        self.health.up = False
        self.health.failures += 1
        delay = backoff_delay(
            self.health.failures,
            self.spec.backoff_initial,
            self.spec.backoff_max,
            self.rng.random(),
        )
        self.health.retry_at = mono + delay
        for sig in group.signals:
            h = self.health.signals[sig.name]
            h.errors += 1
            h.last_error = why

    def _device_up(self) -> None:
        self.health.up = True
        self.health.failures = 0
        self.health.retry_at = 0.0


def _code_of(exc: RemoteProtocolError) -> int:
    parts = exc.detail.split()
    return int(parts[1]) if len(parts) > 1 and parts[0] == "code" and parts[1].isdigit() else -1
