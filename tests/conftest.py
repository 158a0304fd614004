"""Shared fixtures: a real Mosquitto broker for broker tests, and unique topic prefixes.

- ``mosquitto``: one Mosquitto child per test session on a free loopback port (restarted
  if a test stopped it). Fails, never skips, when Mosquitto is missing: CI installs it.
- ``mosquitto_factory``: a private broker per call (for tests that restart or kill the
  broker, or need extra config such as an ACL or a packet size limit); stopped at teardown.
- ``topic_prefix``: a topic prefix unique to the test, so tests sharing a broker never see
  each other's messages (retained ones included).
- ``events``: makes an :class:`EventLog`, a thread-safe ``on_event`` sink with waits.

Any test using a broker fixture is marked ``broker`` automatically.
"""

from __future__ import annotations

import re
import shutil
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fedcore.transport.base import MessageReceived, TransportEvent
from fedgate.broker import RunningBroker, start_broker

BROKER_FIXTURES = {"mosquitto", "mosquitto_factory"}
E = TypeVar("E")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if BROKER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)


def _require_mosquitto() -> None:
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not on PATH: broker tests need it (apt-get install mosquitto)")


@pytest.fixture(scope="session")
def _mosquitto_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningBroker]:
    _require_mosquitto()
    broker = start_broker(
        prefer="mosquitto", data_dir=tmp_path_factory.mktemp("mosquitto"), fallback=False
    )
    yield broker
    broker.stop()


@pytest.fixture
def mosquitto(_mosquitto_session: RunningBroker) -> RunningBroker:
    """The session's Mosquitto (``.url``, ``.port``), running."""
    if not _mosquitto_session.running:
        _mosquitto_session.start()
    return _mosquitto_session


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    """``mosquitto_factory(**start_broker_kwargs)`` -> a new private Mosquitto."""
    _require_mosquitto()
    started: list[RunningBroker] = []

    def make(**kwargs: Any) -> RunningBroker:
        data_dir = tmp_path / f"mosquitto-{len(started)}"
        broker = start_broker(prefer="mosquitto", data_dir=data_dir, fallback=False, **kwargs)
        started.append(broker)
        return broker

    yield make
    for broker in started:
        broker.stop()


@pytest.fixture
def topic_prefix(request: pytest.FixtureRequest) -> str:
    """``test/<test name>/<random>``: unique per test and per run."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", request.node.name)[:60]
    return f"test/{name}/{uuid.uuid4().hex[:8]}"


class EventLog:
    """Collects transport events from the network thread; tests wait on it."""

    def __init__(self) -> None:
        self.events: list[TransportEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: TransportEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def wait_for(
        self, kind: type[E], where: Callable[[E], bool] = lambda e: True, *, after: int = 0,
        timeout: float = 10.0,
    ) -> E:
        """The first event of ``kind`` at index >= ``after`` matching ``where``."""

        def find() -> E | None:
            for event in self.events[after:]:
                if isinstance(event, kind) and where(event):
                    return event
            return None

        with self._cond:
            found = self._cond.wait_for(find, timeout)
        if found is None:
            raise AssertionError(f"no {kind.__name__} within {timeout} s; got {self.events}")
        return found

    def messages(self, n: int, timeout: float = 10.0) -> list[MessageReceived]:
        """Wait until ``n`` messages arrived; return them in order."""
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self._messages()) >= n, timeout)
            got = self._messages()
        if not ok:
            raise AssertionError(f"expected {n} messages within {timeout} s, got {got}")
        return got

    def _messages(self) -> list[MessageReceived]:
        return [e for e in self.events if isinstance(e, MessageReceived)]

    def __len__(self) -> int:
        with self._cond:
            return len(self.events)


@pytest.fixture
def events() -> Callable[[], EventLog]:
    return EventLog
