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

Readiness: the bridge tells systemd ``READY=1`` only once it has done its work once, that is
when every device has completed its first poll cycle and what that cycle read has been
committed to the store, so that a unit ordered after it finds data. A cycle that failed (the
device is down) counts as completed: a dead device delays readiness by its timeout and
retries, never forever. Workers count a device's cycle only after queueing its batch, and the
main thread reads those counts *before* it drains the queue, so the flush that follows holds
every batch counted. ``STATUS=`` then says how many samples were written and how many devices
are down, and is refreshed with every watchdog ping.

Metrics (``[bridge] metrics_port``): :class:`BridgeMetrics` mirrors the counters after every
flush into a :class:`fedcore.exporter.Registry` served on ``/metrics``.

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

from fedcore.errors import ConfigError
from fedcore.exporter import MetricsServer, Registry
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

    def size_bytes(self) -> int: ...

    def close(self) -> None: ...


class StoreSink:
    """Writes the edge sample file (:mod:`fedcore.samples`) and keeps it within bounds."""

    def __init__(self, spec: StoreSpec) -> None:
        self.writer = SampleWriter(spec.path, spec.max_bytes, spec.max_age_s)

    def write(self, samples: Sequence[Sample]) -> int:
        return self.writer.write(samples)

    def maintain(self, now: float) -> EvictionResult:
        return self.writer.evict(now)

    def size_bytes(self) -> int:
        """Bytes on disk: the file and its write-ahead log."""
        total = 0
        for suffix in ("", "-wal"):
            try:
                total += os.stat(f"{self.writer.path}{suffix}").st_size
            except FileNotFoundError:
                pass
        return total

    def close(self) -> None:
        self.writer.close()


class NullSink:
    """Keeps nothing (``fedgate bridge probe`` only looks at live values)."""

    def write(self, samples: Sequence[Sample]) -> int:
        return len(samples)

    def maintain(self, now: float) -> EvictionResult:
        return EvictionResult(0, 0)

    def size_bytes(self) -> int:
        return 0

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
        cycles: dict[str, int],
    ) -> None:
        super().__init__(name=f"bridge-{name}", daemon=True)
        self.pollers = pollers
        self.out = out
        self.stop_event = stop
        self.close_link = close
        self.cycles = cycles  # device -> completed poll cycles; this thread writes its keys

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
                        self.cycles[p.spec.name] += 1  # after the put: see "Readiness"
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
        log.info("device %s is back", spec.name)


@dataclass(frozen=True, slots=True)
class BridgeStats:
    written: int
    seconds: float
    evicted: int


class BridgeMetrics:
    """The bridge's Prometheus metrics, refreshed by the main thread after every flush."""

    def __init__(self, registry: Registry, config: BridgeConfig) -> None:
        self.samples_written = registry.counter(
            "fedgate_bridge_samples_written", "Samples committed to the sample store"
        )
        self.rows_evicted = registry.counter(
            "fedgate_bridge_rows_evicted", "Samples deleted by the eviction policy", ["reason"]
        )
        self.store_bytes = registry.gauge(
            "fedgate_bridge_store_bytes", "Size of the sample store on disk (file and WAL)"
        )
        self.store_limit = registry.gauge(
            "fedgate_bridge_store_limit_bytes", "Size bound of the store (max_store_mb)"
        )
        self.up = registry.gauge(
            "fedgate_bridge_device_up", "1 while the device answers, 0 while it is down", ["device"]
        )
        self.good_reads = registry.counter(
            "fedgate_bridge_device_good_reads", "Signal values read successfully", ["device"]
        )
        self.failed_reads = registry.counter(
            "fedgate_bridge_device_failed_reads",
            "Signal reads that failed (timeout, refused, Modbus exception, bad data)",
            ["device"],
        )
        self.last_success = registry.gauge(
            "fedgate_bridge_device_last_success_timestamp_seconds",
            "Unix time of the device's last good value (absent until the first)",
            ["device"],
        )
        self.store_limit.set(config.store.max_bytes)
        for reason in ("age", "size"):
            self.rows_evicted.inc(0, reason=reason)

    def update(self, written: int, store_bytes: int, health: dict[str, DeviceHealth]) -> None:
        self.samples_written.set(written)
        self.store_bytes.set(store_bytes)
        for device, h in health.items():
            signals = list(h.signals.values())
            self.up.set(1 if h.up else 0, device=device)
            self.good_reads.set(sum(s.reads for s in signals), device=device)
            self.failed_reads.set(sum(s.errors for s in signals), device=device)
            last = max((s.last_good for s in signals if s.last_good is not None), default=None)
            if last is not None:
                self.last_success.set(last, device=device)

    def evicted(self, result: EvictionResult) -> None:
        self.rows_evicted.inc(result.by_age, reason="age")
        self.rows_evicted.inc(result.by_size, reason="size")


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
        self.cycles: dict[str, int] = {d.name: 0 for d in config.devices}
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
            self.workers.append(
                _LinkWorker(bus, pollers, self.queue, self.stop_event, close, self.cycles)
            )

    def polls(self) -> int:
        """Good reads of the least-read signal of any device (= rows for one-request maps)."""
        return min(
            (h.reads for p in self.pollers.values() for h in p.health.signals.values()), default=0
        )

    def health(self) -> dict[str, DeviceHealth]:
        return {name: p.health for name, p in self.pollers.items()}

    def first_cycle_done(self) -> bool:
        """Every device has completed (or failed) at least one poll cycle."""
        return all(n > 0 for n in self.cycles.values())

    def status(self) -> str:
        down = sum(1 for h in self.health().values() if not h.up)
        return f"{self.written} samples written, {down} of {len(self.pollers)} devices down"

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
        metrics: BridgeMetrics | None = None,
    ) -> BridgeStats:
        """Serve until ``stop`` is set, ``duration`` passes, ``until_samples`` are written, or
        every device has answered ``until_polls_per_device`` polls (and they are written)."""
        t0 = time.monotonic()
        last_evict = t0
        last_ping = 0.0
        ready = False
        self.start()
        interval = self.config.store.flush_interval
        try:
            while True:
                if stop is not None and stop.wait(interval):
                    break
                if stop is None:
                    time.sleep(interval)
                cycle_done = ready or self.first_cycle_done()  # before the pump: "Readiness"
                self.pump()
                now = time.monotonic()
                if metrics:
                    metrics.update(self.written, self.sink.size_bytes(), self.health())
                if not ready and cycle_done:
                    ready = True
                    if notifier:
                        notifier.notify(f"READY=1\nSTATUS={self.status()}")
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
                    if metrics:
                        metrics.evicted(result)
                    last_evict = now
                # systemd arms the watchdog once the unit is ready; no pings before
                if ready and notifier and watchdog_s and now - last_ping >= watchdog_s / 2:
                    if self.alive():
                        notifier.notify(f"WATCHDOG=1\nSTATUS={self.status()}")
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
    registry = Registry()
    metrics = BridgeMetrics(registry, config) if config.metrics.port else None
    server = _serve_metrics(registry, config) if metrics else None
    try:
        stats = Bridge(config, seed=os.getpid()).run(
            stop=stop,
            notifier=SystemdNotifier(notify_socket),
            watchdog_s=watchdog_s,
            metrics=metrics,
        )
        log.info("bridge stopped: %d samples written in %.0f s", stats.written, stats.seconds)
        return stats
    finally:
        if server:
            server.close()


def _serve_metrics(registry: Registry, config: BridgeConfig) -> MetricsServer:
    try:
        server = MetricsServer(registry, config.metrics.port, config.metrics.addr)
    except OSError as exc:  # taken port, or an address this host does not have
        raise ConfigError(
            config.file,
            "bridge.metrics_port",
            config.metrics.port,
            f"cannot listen on {config.metrics.addr}:{config.metrics.port}: {exc.strerror}",
        ) from exc
    log.info("metrics on http://%s:%d/metrics", config.metrics.addr, server.port)
    return server
