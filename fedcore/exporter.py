"""A small Prometheus exporter shared by the three services (`metrics_port` in their configs).

Theory of operation
-------------------
A :class:`Registry` holds counters and gauges, each optionally split by label values, and
renders them in the Prometheus text exposition format (version 0.0.4). :class:`MetricsServer`
serves ``GET /metrics`` from a daemon thread (``http.server``), loopback by default.

Why not ``prometheus-client``: importing it costs about 10 MB of resident memory, a fifth of
a gateway's budget, for a format that takes a page to write (docs/decisions.md);
``http.server`` (~7 MB) is imported only when a port is configured. Values are
set by the service's own loop thread and read by the server thread; one lock covers both.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from fedcore.errors import LocalProtocolError

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metric:
    """One metric family: a name, a type, help text and a value per label combination."""

    def __init__(self, registry: Registry, name: str, help: str, kind: str,
                 labels: tuple[str, ...]) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.labels = labels
        self._lock = registry.lock
        self._values: dict[tuple[str, ...], float] = {}
        if not labels:
            self._values[()] = 0.0

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labels):
            raise LocalProtocolError(f"{self.name}: labels {sorted(labels)} != {list(self.labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self._key(labels)] = float(value)

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        with self._lock:
            key = self._key(labels)
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def clear(self) -> None:
        """Forget every label combination (a gauge whose label set changed)."""
        with self._lock:
            self._values = {} if self.labels else {(): 0.0}

    def render(self) -> Iterable[str]:
        suffix = "_total" if self.kind == "counter" else ""
        yield f"# HELP {self.name}{suffix} {_escape(self.help)}"
        yield f"# TYPE {self.name}{suffix} {self.kind}"
        for key, value in sorted(self._values.items()):
            if key:
                pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in zip(self.labels, key, strict=True))
                yield f"{self.name}{suffix}{{{pairs}}} {_number(value)}"
            else:
                yield f"{self.name}{suffix} {_number(value)}"


class Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._metrics: dict[str, Metric] = {}

    def _add(self, name: str, help: str, kind: str, labels: Iterable[str]) -> Metric:
        if name in self._metrics:
            raise LocalProtocolError(f"metric {name} registered twice")
        metric = Metric(self, name, help, kind, tuple(labels))
        self._metrics[name] = metric
        return metric

    def gauge(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        return self._add(name, help, "gauge", labels)

    def counter(self, name: str, help: str, labels: Iterable[str] = ()) -> Metric:
        """A counter; exposed as ``NAME_total`` as Prometheus names counters."""
        return self._add(name, help, "counter", labels)

    def render(self) -> bytes:
        with self.lock:
            lines = [line for m in self._metrics.values() for line in m.render()]
        return ("\n".join(lines) + "\n").encode("utf-8")


class MetricsServer:
    """Serve ``registry`` on ``http://addr:port/metrics`` until :meth:`close`."""

    def __init__(self, registry: Registry, port: int, addr: str = "127.0.0.1") -> None:
        # imported here: http.server costs ~7 MB, paid only by services that export metrics
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        body_of = registry.render

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404)
                    return
                body = body_of()
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # a scrape every 15 s is not news

        self.server = ThreadingHTTPServer((addr, port), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
