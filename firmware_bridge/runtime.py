"""The bridge service: poll every device, hand samples to a sink, tell systemd we are alive.

Theory of operation
-------------------
One worker thread per *link* (a TCP host:port or a serial port) runs the pollers of the
devices on it (:class:`~firmware_bridge.modbus.ModbusPoller`,
:class:`~firmware_bridge.serial_reader.LinePoller`), sleeping until the next read is due.
Threads rather than asyncio because pyserial and the pymodbus synchronous clients block, and
a thread per wire isolates a device that hangs: it can only stall its own wire, where the
bus serialises requests anyway. Workers put batches on a queue.

The main thread drains the queue every ``flush_interval`` seconds into the :class:`SampleSink`
(one transaction per flush: a kill -9 loses at most one interval of samples), applies the
store's eviction policy once a minute, and pings the systemd watchdog. It pings only while
every worker thread is alive, so a wedged bridge is restarted by systemd.

The sink is the whole interface to the edge: :class:`StoreSink` writes the sample file whose
schema lives in :mod:`fedcore.samples`; the edge service reads the same file.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from fedcore.samples import EvictionResult, Sample, SampleWriter
from fedcore.systemd import SystemdNotifier
from firmware_bridge.config import BridgeConfig, DeviceSpec, LineLink, StoreSpec
from firmware_bridge.modbus import DeviceHealth, ModbusPoller, PymodbusLink
from firmware_bridge.serial_reader import LinePoller

log = logging.getLogger("fedgate.bridge")
EVICT_EVERY_S = 60.0


class SampleSink(Protocol):
    """Where samples go. ``write`` commits a batch atomically and returns its size."""

    def write(self, samples: Sequence[Sample]) -> int: ...

    def maintain(self, now: float) -> EvictionResult: ...

    def close(self) -> None: ...


class StoreSink:
    """Writes the edge sample file (:mod:`fedcore.samples`) and keeps it within bounds."""

    def __init__(self, spec: StoreSpec) -> None:
        self.writer = SampleWriter(spec.path, spec.max_bytes, spec.max_age_s)

    def write(self, samples: Sequence[Sample]) -> int:
        return self.writer.write(samples)

    def maintain(self, now: float) -> EvictionResult:
        return self.writer.evict(now)

    def close(self) -> None:
        self.writer.close()


class NullSink:
    """Keeps nothing (``fedgate bridge probe`` only looks at live values)."""

    def write(self, samples: Sequence[Sample]) -> int:
        return len(samples)

    def maintain(self, now: float) -> EvictionResult:
        return EvictionResult(0, 0)

    def close(self) -> None:
        pass


Poller = ModbusPoller | LinePoller


class _LinkWorker(threading.Thread):
    def __init__(
        self,
        name: str,
        pollers: list[Poller],
        out: queue.Queue[list[Sample]],
        stop: threading.Event,
        close: Callable[[], None],
    ) -> None:
        super().__init__(name=f"bridge-{name}", daemon=True)
        self.pollers = pollers
        self.out = out
        self.stop_event = stop
        self.close_link = close

    def run(self) -> None:
        try:
            while not self.stop_event.is_set():
                now = time.monotonic()
                due = min(p.due_at() for p in self.pollers)
                if due > now:
                    self.stop_event.wait(min(due - now, 0.5))
                    continue
                for p in self.pollers:
                    if p.due_at() <= now:
                        was_up = p.health.up
                        batch = p.poll(now, time.time(), clock=time.time)
                        if batch:
                            self.out.put(batch)
                        _log_transition(p.spec, was_up, p.health)
        finally:
            self.close_link()


def _log_transition(spec: DeviceSpec, was_up: bool, health: DeviceHealth) -> None:
    if was_up and not health.up:
        errs = [h.last_error for h in health.signals.values() if h.last_error]
        log.warning(
            "device %s down (%s); retrying with backoff", spec.name, errs[-1] if errs else "?"
        )
    elif not was_up and health.up:
        log.warning("device %s is back", spec.name)


@dataclass(frozen=True, slots=True)
class BridgeStats:
    written: int
    seconds: float
    evicted: int


class Bridge:
    """All devices of one config; ``start`` the workers, ``pump`` samples into the sink."""

    def __init__(
        self, config: BridgeConfig, sink: SampleSink | None = None, seed: int | None = None
    ) -> None:
        self.config = config
        self.sink: SampleSink = sink if sink is not None else StoreSink(config.store)
        self.queue: queue.Queue[list[Sample]] = queue.Queue()
        self.stop_event = threading.Event()
        self.written = 0
        self.evicted = 0
        rng = random.Random(seed)
        start = time.monotonic()
        by_link: dict[str, list[DeviceSpec]] = {}
        for dev in config.devices:
            by_link.setdefault(dev.link.bus, []).append(dev)
        self.pollers: dict[str, Poller] = {}
        self.workers: list[_LinkWorker] = []
        for bus, devs in by_link.items():
            pollers: list[Poller] = []
            if isinstance(devs[0].link, LineLink):
                lp = LinePoller(devs[0], random.Random(rng.random()), start)
                pollers.append(lp)
                close: Callable[[], None] = lp.close
            else:
                link = PymodbusLink(devs[0].link, max(d.timeout for d in devs))
                pollers.extend(
                    ModbusPoller(d, link, random.Random(rng.random()), start) for d in devs
                )
                close = link.close
            for p in pollers:
                self.pollers[p.spec.name] = p
            self.workers.append(_LinkWorker(bus, pollers, self.queue, self.stop_event, close))

    def polls(self) -> int:
        """Good reads of the least-read signal of any device (= rows for one-request maps)."""
        return min(
            (h.reads for p in self.pollers.values() for h in p.health.signals.values()), default=0
        )

    def health(self) -> dict[str, DeviceHealth]:
        return {name: p.health for name, p in self.pollers.items()}

    def start(self) -> None:
        for w in self.workers:
            w.start()

    def alive(self) -> bool:
        return all(w.is_alive() for w in self.workers)

    def pump(self) -> int:
        """Commit everything queued so far as one batch; returns samples written."""
        batch: list[Sample] = []
        while True:
            try:
                batch.extend(self.queue.get_nowait())
            except queue.Empty:
                break
        n = self.sink.write(batch) if batch else 0
        self.written += n
        return n

    def stop(self) -> None:
        self.stop_event.set()
        for w in self.workers:
            w.join(timeout=max(d.timeout for d in self.config.devices) * 2 + 1)
        self.pump()
        self.sink.close()

    def run(
        self,
        *,
        until_samples: int | None = None,
        until_polls_per_device: int | None = None,
        duration: float | None = None,
        stop: threading.Event | None = None,
        notifier: SystemdNotifier | None = None,
        watchdog_s: float | None = None,
    ) -> BridgeStats:
        """Serve until ``stop`` is set, ``duration`` passes, ``until_samples`` are written, or
        every device has answered ``until_polls_per_device`` polls (and they are written)."""
        t0 = time.monotonic()
        last_evict = t0
        last_ping = 0.0
        self.start()
        if notifier:
            notifier.notify(f"READY=1\nSTATUS=polling {len(self.config.devices)} devices")
        interval = self.config.store.flush_interval
        try:
            while True:
                if stop is not None and stop.wait(interval):
                    break
                if stop is None:
                    time.sleep(interval)
                self.pump()
                now = time.monotonic()
                if until_samples is not None and self.written >= until_samples:
                    break
                if until_polls_per_device is not None and self.polls() >= until_polls_per_device:
                    self.pump()  # what the last polls queued since the flush above
                    break
                if duration is not None and now - t0 >= duration:
                    break
                if now - last_evict >= EVICT_EVERY_S:
                    result = self.sink.maintain(time.time())
                    self.evicted += result.by_age + result.by_size
                    last_evict = now
                if notifier and watchdog_s and now - last_ping >= watchdog_s / 2:
                    if self.alive():
                        down = sum(1 for h in self.health().values() if not h.up)
                        notifier.notify(
                            f"WATCHDOG=1\nSTATUS={self.written} samples, {down} devices down"
                        )
                        last_ping = now
                    else:
                        log.error("a link worker died; withholding the watchdog ping")
        finally:
            if notifier:
                notifier.notify("STOPPING=1")
            self.stop()
        return BridgeStats(self.written, time.monotonic() - t0, self.evicted)


def run_bridge(
    config: BridgeConfig,
    *,
    until_samples: int | None = None,
    until_polls_per_device: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
    seed: int | None = None,
) -> BridgeStats:
    """Run the bridge in this thread into ``config.store`` until a condition is met.

    Conditions (the first met wins): ``until_samples`` written in total; every device read
    ``until_polls_per_device`` times (with the wind map and ``advance="read"``, that is at
    least that many rows per turbine); ``duration`` seconds; ``stop`` set."""
    if (
        until_samples is None
        and until_polls_per_device is None
        and duration is None
        and stop is None
    ):
        raise ValueError("give a stop condition, or the bridge runs forever")
    return Bridge(config, seed=seed).run(
        until_samples=until_samples,
        until_polls_per_device=until_polls_per_device,
        duration=duration,
        stop=stop,
    )


def serve(
    config: BridgeConfig,
    notify_socket: str | None,
    watchdog_usec: int | None,
    stop: threading.Event,
) -> BridgeStats:
    """The systemd service (``fedgate bridge run``); environment values come from __main__."""
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)  # our own counters say it better
    watchdog_s = watchdog_usec / 1e6 if watchdog_usec else None
    log.info("bridge starting: %d devices, store %s", len(config.devices), config.store.path)
    return Bridge(config, seed=os.getpid()).run(
        stop=stop, notifier=SystemdNotifier(notify_socket), watchdog_s=watchdog_s
    )
