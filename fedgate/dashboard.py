"""`fedgate dashboard`: a read-only web page of a fleet, live, served by the stdlib.

Theory of operation
-------------------
A :class:`~fedgate.fleetwatch.FleetWatch` keeps the fleet view current from the retained
topics. :class:`DashboardApp` turns a request path into a :class:`Response` (no sockets, so
it is tested directly); :func:`serve` puts it behind a ``ThreadingHTTPServer``:

- ``/``: the page (``dashboard_assets/index.html``);
- ``/assets/NAME``: a file of ``dashboard_assets``, all read once at start, so nothing else
  on disk can be reached through a path;
- ``/api/fleet``: the watch's snapshot (the object ``fedgate status --json`` prints, see
  :mod:`fedgate.fleetview`) plus ``"dashboard": {"broker", "connected"}``.

The page polls ``/api/fleet`` every 2 s and draws everything itself (vanilla JS, hand-written
SVG). Nothing is fetched from anywhere else, so it works offline; the Content-Security-Policy
(``'self'`` only, no inline script) keeps it that way and is a second wall behind the page's
own escaping of fleet strings. Non-finite floats become ``null``: ``NaN`` is not JSON.

Read-only: GET and HEAD, nothing else. Loopback by default; while bound to a loopback address
only requests whose ``Host`` is a loopback name are answered, so a web site the operator has
open cannot read the fleet through a DNS-rebound name.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import logging
import math
import signal
import socket
import socketserver
import sys
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Any, Protocol

from fedcore.errors import ConfigError

log = logging.getLogger("fedgate.dashboard")

ASSETS_PACKAGE = "fedgate"
ASSETS_FOLDER = "dashboard_assets"
CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]"})


class FleetSource(Protocol):
    """What the dashboard needs of a :class:`~fedgate.fleetwatch.FleetWatch`."""

    fleet: str
    connected: threading.Event

    def snapshot(self) -> dict[str, object]: ...


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    content_type: str
    body: bytes
    headers: dict[str, str] = field(default_factory=dict)


def load_assets() -> dict[str, bytes]:
    """Every file of the page, by name, read from the installed package."""
    folder = resources.files(ASSETS_PACKAGE) / ASSETS_FOLDER
    return {item.name: item.read_bytes() for item in folder.iterdir()
            if item.is_file() and not item.name.startswith(".")}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """``Host`` without its port: ``[::1]:8470`` -> ``[::1]``, ``localhost:8470`` -> ``localhost``."""
    header = header.strip().lower()
    if header.startswith("["):
        return header.split("]", 1)[0] + "]"
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class DashboardApp:
    """Requests to responses, for one watched fleet. Thread-safe: it only reads."""

    def __init__(self, watch: FleetSource, broker: str, host: str,
                 assets: dict[str, bytes] | None = None) -> None:
        self.watch = watch
        self.broker = broker
        self.assets = load_assets() if assets is None else assets
        self.allowed_hosts: frozenset[str] | None = None  # None: any Host (not on loopback)
        if is_loopback(host):
            bracketed = f"[{host}]" if ":" in host else host
            self.allowed_hosts = LOOPBACK_NAMES | {bracketed.lower()}

    def respond(self, path: str, host_header: str | None) -> Response:
        if (self.allowed_hosts is not None and host_header is not None
                and _host_name(host_header) not in self.allowed_hosts):
            return _text(403, f"this dashboard listens on loopback and answers only to a "
                              f"loopback name, not to Host {host_header[:100]!r}\n")
        path = path.split("?", 1)[0].split("#", 1)[0]
        if path in ("/", "/index.html"):
            return self._asset("index.html")
        if path == "/api/fleet":
            return self._fleet()
        if path.startswith("/assets/"):
            return self._asset(path.removeprefix("/assets/"))
        return _text(404, f"no such page: {path[:200]}\n")

    def _asset(self, name: str) -> Response:
        body = self.assets.get(name)
        if body is None:
            return _text(404, f"no such asset: {name[:200]}\n")
        suffix = name[name.rfind("."):] if "." in name else ""
        return Response(200, CONTENT_TYPES.get(suffix, "application/octet-stream"), body,
                        {"Cache-Control": "no-cache"})

    def _fleet(self) -> Response:
        view = dict(self.watch.snapshot())
        view["dashboard"] = {"broker": self.broker, "connected": self.watch.connected.is_set()}
        body = json.dumps(json_safe(view), allow_nan=False, separators=(",", ":")).encode()
        return Response(200, "application/json", body, {"Cache-Control": "no-store"})


def _text(status: int, message: str) -> Response:
    return Response(status, "text/plain; charset=utf-8", message.encode("utf-8"))


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"  # keep-alive: one connection for the page's polls

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(send_body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        try:
            response = self.server.app.respond(self.path, self.headers.get("Host"))
        except Exception:  # a bug behind one request must not take the dashboard down
            log.exception("dashboard request %s failed", self.path[:200])
            response = _text(500, "the dashboard failed to answer; see its log\n")
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in {**SECURITY_HEADERS, **response.headers}.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a poll every 2 s per open page is not news


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], app: DashboardApp) -> None:
        self.app = app
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # TCPServer's bind, without HTTPServer's reverse DNS lookup of the address (which can
        # hang for seconds on a plant network without DNS)
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a browser that closed its tab mid-answer is not an error worth a traceback
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Server6(_Server):
    address_family = socket.AF_INET6


def make_server(watch: FleetSource, host: str, port: int, broker: str) -> _Server:
    """Bind the dashboard; a taken port or a foreign address is the operator's to fix (78)."""
    app = DashboardApp(watch, broker, host)
    server_class = _Server6 if ":" in host else _Server
    try:
        return server_class((host.strip("[]"), port), app)
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
            raise ConfigError("<command line>", "--host", host,
                              f"cannot listen on this address: {exc.strerror or exc}") from None
        raise ConfigError("<command line>", "--port", port,
                          f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def url_of(server: _Server) -> str:
    host = server.server_name
    return f"http://{f'[{host}]' if ':' in host else host}:{server.server_port}/"


def serve(watch: FleetSource, host: str, port: int, broker: str, server: _Server | None = None) -> int:
    """Serve the dashboard until Ctrl-C or SIGTERM; print its URL first (one line).
    ``server``: one already bound by :func:`make_server` (the port is checked first)."""
    server = server or make_server(watch, host, port, broker)
    stop = threading.Event()
    thread = threading.Thread(target=server.serve_forever, name="dashboard", daemon=True)
    thread.start()
    previous = None
    try:
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
        print(f"fedgate dashboard: {url_of(server)} (fleet {watch.fleet} from {broker}; "
              f"Ctrl-C to stop)", flush=True)
        while not stop.wait(1.0):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return 0
