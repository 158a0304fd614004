"""`fedgate dashboard`: the server's routes, its exits, and the page in a real headless Chromium.

The browser tests publish retained task-state and gateway-status messages to a real
Mosquitto, start ``fedgate dashboard`` as a process, load the page with ``chromium
--headless --dump-dom`` and read the rendered DOM. The page records script errors, rejected
promises, failed loads and CSP violations on ``<html data-js-errors>``; every page test
requires it to read 0. Chromium must be installed (scripts/test installs it): these tests
fail, never skip, without it.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fedcore.protocol import codec
from fedcore.protocol.messages import Kind, RoundPoint, Status, TaskState
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker, free_port
from fedgate.dashboard import DashboardApp, json_safe, load_assets, make_server, url_of

ASSETS = Path(__file__).resolve().parents[2] / "fedgate" / "dashboard_assets"
SCRIPT = '<script>document.documentElement.setAttribute("data-pwned","script")</script>'
IMG = "<img src=x onerror=\"document.documentElement.setAttribute('data-pwned','img')\">"
CANARY_ID = f"gw{SCRIPT}"
QUARANTINED_ID = f"gw-{IMG}"


# --------------------------------------------------------------------------- DOM of a dump


class Element:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Element | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Element | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def classes(self) -> set[str]:
        return set(self.attrs.get("class", "").split())

    def all(self, tag: str | None = None, **attrs: str) -> list[Element]:
        """Descendants with this tag (any if None) and these attribute values."""
        found = []
        for child in self.children:
            if isinstance(child, Element):
                wanted = {k.replace("_", "-"): v for k, v in attrs.items()}
                if (tag is None or child.tag == tag) and all(child.attrs.get(k) == v for k, v in wanted.items()):
                    found.append(child)
                found += child.all(tag, **attrs)
        return found

    def one(self, tag: str | None = None, **attrs: str) -> Element:
        found = self.all(tag, **attrs)
        assert len(found) == 1, f"expected one <{tag} {attrs}>, found {len(found)}"
        return found[0]


class _TreeBuilder(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Element("#document", {}, None)
        self.current = self.root

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element = Element(tag, {k: v or "" for k, v in attrs}, self.current)
        self.current.children.append(element)
        if tag not in self.VOID:
            self.current = element

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Element(tag, {k: v or "" for k, v in attrs}, self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Element | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def parse_dom(html: str) -> Element:
    builder = _TreeBuilder()
    builder.feed(html)
    builder.close()
    return builder.root.one("html")


# --------------------------------------------------------------------------- the browser


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not on PATH: the dashboard tests need it (apt-get install chromium; "
                    "scripts/test installs it)")
    return path


def render_page(url: str, profile: Path, budget_ms: int = 5000) -> tuple[Element, str]:
    """Load ``url`` in headless Chromium, let it run ``budget_ms`` of virtual time (the page
    polls every 2 s), and return the rendered DOM and the raw dump."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--virtual-time-budget={budget_ms}", "--dump-dom", url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"chromium exited {done.returncode}: {done.stderr[-2000:]}"
    assert "<html" in done.stdout, f"chromium dumped no page; stderr: {done.stderr[-2000:]}"
    return parse_dom(done.stdout), done.stdout


def assert_no_script_errors(html: Element) -> None:
    assert html.attrs.get("data-js-errors") == "0", (
        f"the page reported script errors: {html.attrs.get('data-js-error-log')} "
        f"(errors.js loaded: {'data-js-errors' in html.attrs})")
    assert "data-pwned" not in html.attrs


# --------------------------------------------------------------------------- the fleet


class Publisher:
    """Publishes retained, unsigned envelopes of one fleet to a real broker."""

    def __init__(self, broker: RunningBroker, fleet: str, task: str) -> None:
        self.fleet, self.task = fleet, task
        self.topics = Topics(fleet, task)
        self.connected = threading.Event()
        self.transport = PahoTransport(broker.url, f"dash-pub-{uuid.uuid4().hex[:8]}", clean_start=True,
                                       rng=random.Random(0))
        self.transport.start(lambda e: self.connected.set() if isinstance(e, Connected) else None)
        assert self.connected.wait(10), "publisher did not connect"

    def publish(self, kind: Kind, topic: str, sender: str, body: msgspec.Struct) -> None:
        env = codec.make_envelope(kind, self.fleet, self.task, 0, sender, body, time.time())
        result = self.transport.publish(topic, codec.encode(env), qos=1, retain=True, wait=10)
        assert not result.denied

    def state(self, state: TaskState) -> None:
        self.publish(Kind.STATE, self.topics.state(), "aggregator", state)

    def status(self, device: str, status: Status) -> None:
        self.publish(Kind.STATUS, self.topics.status(device), device, status)

    def close(self) -> None:
        self.transport.stop()


@pytest.fixture
def publisher(mosquitto: RunningBroker) -> Iterator[Publisher]:
    pub = Publisher(mosquitto, f"plant-{uuid.uuid4().hex[:8]}", "power")
    yield pub
    pub.close()


class DashboardProcess:
    """``fedgate dashboard`` as a child process; stopped with SIGTERM on every exit path."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "fedgate", "dashboard", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.first_line = self._first_line(timeout=30)
        match = re.search(r"http://\S+/", self.first_line)
        assert match, f"no URL in the first line {self.first_line!r}; stderr: {self._stderr()}"
        self.url = match.group(0)

    def _first_line(self, timeout: float) -> str:
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not lines or not lines[0]:
            self.proc.kill()
            raise AssertionError(f"fedgate dashboard printed no URL within {timeout} s: {self._stderr()}")
        return lines[0]

    def _stderr(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        return self.proc.stderr.read()[-2000:] if self.proc.stderr else ""

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> DashboardProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def dashboard(broker: RunningBroker, fleet: str) -> DashboardProcess:
    return DashboardProcess("--broker", broker.url, "--fleet", fleet, "--port", "0", "--timeout", "10")


HISTORY = (
    RoundPoint(1, 1, 2, 800, 0.52, 3.1, 1_700_000_100.0),
    RoundPoint(2, 2, 3, 1200, 0.41, 2.9, 1_700_000_200.0),
    RoundPoint(3, 3, 2, 900, 0.36, 3.3, 1_700_000_300.0),
    RoundPoint(4, 4, 3, 1300, 0.33, 3.0, 1_700_000_400.0),
)


def running_fleet(pub: Publisher) -> None:
    now = time.time()
    pub.state(TaskState(
        lineage="power-3f2a", phase="collecting", round=5, model_version=5, rounds_planned=20,
        online=("gw-press-1",), quarantined=(QUARANTINED_ID,), deployed_version=4,
        deployment_mode="canary", candidate=5, canary=(CANARY_ID,),
        rejected={"bad_signature": 2, "<i>stale</i>": 1}, epsilon={"gw-press-2": 1.25},
        metric="rmse", metric_higher_is_better=False, history=HISTORY, updated_at=now))
    pub.status("gw-press-1", Status(
        "online", software="fedgate 0.1.0", model_version=4, trained_version=4, since=now - 300,
        activity="waiting_for_data", activity_detail="62 of 500 training rows", rows=80,
        rows_new=62, rows_needed=500, last_eval={"eval_rmse": math.nan}))
    pub.status("gw-press-2", Status(
        "offline", model_version=3, trained_version=3, since=now - 3 * 3600, activity="ready",
        rows=5000, rows_new=0, last_round=4, last_rows=1300, last_eval={"eval_rmse": 0.31},
        epsilon=1.25))


# --------------------------------------------------------------------------- the page, live


@pytest.mark.timeout(180)
def test_page_shows_the_fleet_live(mosquitto: RunningBroker, publisher: Publisher, tmp_path: Path) -> None:
    running_fleet(publisher)
    with dashboard(mosquitto, publisher.fleet) as dash:
        html, raw = render_page(dash.url, tmp_path / "profile")
        assert dash.stop() == 0  # SIGTERM is a clean shutdown
    assert_no_script_errors(html)
    assert html.attrs["data-api"] == "ok" and int(html.attrs["data-renders"]) >= 2  # it polls

    online = html.one("tr", data_gateway="gw-press-1")
    assert online.attrs["data-state"] == "online" and "warn" in online.classes()
    assert online.one("td", data_col="state").text() == "online"
    assert online.one("td", data_col="activity").text() == "waiting_for_data: 62 of 500 training rows"
    assert online.one("td", data_col="since").text().endswith("(5 min ago)")
    assert online.one("td", data_col="holdout").text() == "rmse \u2013"  # NaN travels as null
    assert online.one("td", data_col="rows").text() == "80"
    assert online.one("td", data_col="new").text() == "62"

    offline = html.one("tr", data_gateway="gw-press-2")
    assert offline.attrs["data-state"] == "offline" and "bad" in offline.classes()
    assert offline.one("td", data_col="state").text() == "OFFLINE"
    assert offline.one("td", data_col="since").text().endswith("(3 h 0 min ago)")
    assert offline.one("td", data_col="runs").text() == "v3"
    assert offline.one("td", data_col="round").text() == "4"
    assert offline.one("td", data_col="holdout").text() == "rmse 0.31"
    assert offline.one("td", data_col="epsilon").text() == "1.25"

    task = html.one("section", data_task="power")
    facts = {f.attrs["data-fact"]: f.one("dd").text() for f in task.all("div") if "data-fact" in f.attrs}
    assert facts["round"] == "5 of 20"
    assert facts["model"] == "v5"
    assert facts["deployed"] == "v4 (canary)"
    assert facts["metric"] == "0.33 (lower is better)"
    assert facts["lineage"] == "power-3f2a"

    for chart, values in (("metric", [p.metric for p in HISTORY]),
                          ("participants", [p.participants for p in HISTORY]),
                          ("rows", [p.rows for p in HISTORY])):
        figure = task.one("figure", data_chart=chart)
        svg = figure.one("svg")
        points = [c for c in svg.all("circle") if "pt" in c.classes()]
        assert svg.attrs["data-points"] == str(len(HISTORY)) and len(points) == len(HISTORY)
        assert [p.one("title").text().split(": ")[1] for p in points] == [f"{v:,}" if isinstance(v, int) else f"{v:g}" for v in values]
        assert len(svg.all("polyline")) == 1
    assert "rmse" in task.one("figure", data_chart="metric").one("figcaption").text()
    assert "lower is better" in task.one("figure", data_chart="metric").one("figcaption").text()

    # device ids from the field are text, never markup
    assert facts["canary"] == f"candidate v5 on {CANARY_ID}"
    assert facts["quarantined"] == QUARANTINED_ID
    assert "<i>stale</i> 1" in facts["rejected"]
    assert len(html.all("script")) == 2 and not html.all("img") and not html.all("i")
    assert "&lt;script&gt;" in raw


@pytest.mark.timeout(180)
def test_page_of_a_fleet_that_has_not_started(mosquitto: RunningBroker, publisher: Publisher,
                                              tmp_path: Path) -> None:
    # nothing published yet
    with dashboard(mosquitto, publisher.fleet) as dash:
        html, _ = render_page(dash.url, tmp_path / "profile-empty", budget_ms=2500)
    assert_no_script_errors(html)
    text = html.one("main").text()
    assert "No task state published yet" in text and "No gateway has reported" in text

    # the aggregator's first state (statistics step, no history) and a gateway with no data
    publisher.state(TaskState(lineage="power-3f2a", phase="statistics", round=0, model_version=0,
                              history=(), metric=""))
    publisher.status("gw-new", Status("online", activity="waiting_for_data",
                                      activity_detail="0 of 500 training rows"))
    with dashboard(mosquitto, publisher.fleet) as dash:
        html, _ = render_page(dash.url, tmp_path / "profile-start", budget_ms=2500)
    assert_no_script_errors(html)
    task = html.one("section", data_task="power")
    for chart in ("metric", "participants", "rows"):
        svg = task.one("figure", data_chart=chart).one("svg")
        assert svg.attrs["data-points"] == "0" and svg.text() == "no rounds yet"
    row = html.one("tr", data_gateway="gw-new")
    assert row.one("td", data_col="since").text() == "\u2013"
    assert row.one("td", data_col="holdout").text() == "\u2013"
    assert row.one("td", data_col="epsilon").text() == "\u2013"
    assert row.one("td", data_col="round").text() == "\u2013"


@pytest.mark.timeout(120)
def test_page_says_when_it_cannot_reach_the_dashboard(tmp_path: Path) -> None:
    # the page's own files, served by a plain file server that has no api/fleet
    site = tmp_path / "site"
    shutil.copytree(ASSETS, site / "assets")
    shutil.copy(ASSETS / "index.html", site / "index.html")
    handler = functools.partial(_QuietFiles, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        html, _ = render_page(f"http://127.0.0.1:{server.server_address[1]}/", tmp_path / "profile")
    finally:
        server.shutdown()
        server.server_close()
    assert_no_script_errors(html)
    assert html.attrs["data-api"] == "error"
    banner = html.one("div", id="banner")
    assert "hidden" not in banner.attrs and "bad" in banner.classes()
    assert banner.text().startswith("Cannot reach the dashboard server (api/fleet): HTTP 404")


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


# --------------------------------------------------------------------------- exits


def _run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedgate", "dashboard", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_a_taken_port_is_a_one_line_config_error(mosquitto: RunningBroker) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = _run("--broker", mosquitto.url, "--fleet", "plant1", "--port", str(port))
    assert done.returncode == 78, done.stderr
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "--port" in done.stderr and str(port) in done.stderr and "in use" in done.stderr


def test_an_unreachable_broker_is_a_one_line_error() -> None:
    done = _run("--broker", f"mqtt://127.0.0.1:{free_port()}", "--fleet", "plant1", "--timeout", "1",
                "--port", "0")
    assert done.returncode == 69, done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "cannot reach the broker" in done.stderr


# --------------------------------------------------------------------------- routes, no browser


class _Watch:
    fleet = "plant1"

    def __init__(self, view: dict[str, object]) -> None:
        self.view = view
        self.connected = threading.Event()
        self.connected.set()

    def snapshot(self) -> dict[str, object]:
        return self.view


def test_routes() -> None:
    app = DashboardApp(_Watch({"fleet": "plant1", "tasks": [], "gateways": []}), "mqtt://b:1883", "127.0.0.1")
    page = app.respond("/", "127.0.0.1:8470")
    assert page.status == 200 and page.content_type.startswith("text/html")
    assert page.body == (ASSETS / "index.html").read_bytes()
    script = app.respond("/assets/dashboard.js?v=1", "localhost:8470")
    assert script.status == 200 and script.content_type.startswith("text/javascript")
    api = app.respond("/api/fleet", "[::1]:8470")
    assert api.status == 200 and api.headers["Cache-Control"] == "no-store"
    assert json.loads(api.body)["dashboard"] == {"broker": "mqtt://b:1883", "connected": True}
    for path in ("/assets/../dashboard.py", "/assets/", "/etc/passwd", "/api"):
        assert app.respond(path, "127.0.0.1:8470").status == 404, path


def test_on_loopback_only_loopback_host_names_are_answered() -> None:
    watch = _Watch({"fleet": "plant1"})
    app = DashboardApp(watch, "mqtt://b:1883", "127.0.0.1")
    assert app.respond("/api/fleet", "rebound.example.com:8470").status == 403
    assert app.respond("/api/fleet", "localhost").status == 200
    anywhere = DashboardApp(watch, "mqtt://b:1883", "0.0.0.0")
    assert anywhere.respond("/api/fleet", "dash.plant.local:8470").status == 200


def test_non_finite_numbers_travel_as_null() -> None:
    view = {"a": math.nan, "b": [math.inf, 1.5, {"c": -math.inf}], "d": (2, "x")}
    assert json_safe(view) == {"a": None, "b": [None, 1.5, {"c": None}], "d": [2, "x"]}
    app = DashboardApp(_Watch({"x": math.nan}), "mqtt://b", "127.0.0.1")
    assert json.loads(app.respond("/api/fleet", None).body)["x"] is None


def test_the_page_fetches_nothing_from_outside_and_writes_no_markup() -> None:
    assets = load_assets()
    assert set(assets) >= {"index.html", "dashboard.js", "dashboard.css", "errors.js"}
    for name, body in assets.items():
        text = body.decode("utf-8")
        urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"'<>)]*", text))
        assert urls <= {"http://www.w3.org/2000/svg"}, f"{name} refers to {urls}"
        sinks = re.findall(r"\.(?:inner|outer)HTML\b|insertAdjacentHTML|document\.write|\beval\(|new Function", text)
        assert not sinks, f"{name} parses strings as markup or code: {sinks}"


def test_served_read_only_with_a_strict_content_policy() -> None:
    server = make_server(_Watch({"fleet": "plant1"}), "127.0.0.1", 0, "mqtt://b:1883")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = url_of(server)
    try:
        with urllib.request.urlopen(base) as page:
            policy = page.headers["Content-Security-Policy"]
            assert "default-src 'none'" in policy and "script-src 'self'" in policy
            assert "connect-src 'self'" in policy and "unsafe" not in policy
            assert page.headers["X-Content-Type-Options"] == "nosniff"
        with urllib.request.urlopen(urllib.request.Request(base + "api/fleet", method="HEAD")) as head:
            assert head.status == 200 and head.read() == b""
        for method in ("POST", "PUT", "DELETE"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(urllib.request.Request(base + "api/fleet", data=b"{}", method=method))
            assert refused.value.code == 501
    finally:
        server.shutdown()
        server.server_close()
