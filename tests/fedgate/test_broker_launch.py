"""Launching Mosquitto and the embedded fallback broker as child processes."""

from __future__ import annotations

import queue
import random
import socket
from pathlib import Path

import pytest

from fedcore.errors import TransportError
from fedcore.transport.base import Connected, MessageReceived, TransportEvent
from fedcore.transport.paho import PahoTransport
from fedgate.broker import free_port, port_accepts, start_broker


def _next(events: queue.Queue[TransportEvent], kind: type, timeout: float = 10.0) -> TransportEvent:
    while True:
        event = events.get(timeout=timeout)
        if isinstance(event, kind):
            return event


def _round_trip(url: str, payload: bytes) -> bytes:
    """Subscribe and publish through the broker with the paho transport."""
    events: queue.Queue[TransportEvent] = queue.Queue()
    t = PahoTransport(url, "launch-test", rng=random.Random(0), clean_start=True)
    t.start(events.put)
    try:
        _next(events, Connected)
        t.subscribe("launch/#")
        # Same connection: the SUBSCRIBE is handled before this PUBLISH.
        assert not t.publish("launch/big", payload, qos=1, wait=10).denied
        message = _next(events, MessageReceived)
        assert isinstance(message, MessageReceived) and message.topic == "launch/big"
        return message.payload
    finally:
        t.stop()


@pytest.mark.broker
def test_mosquitto_on_loopback_with_generated_config(tmp_path: Path) -> None:
    port = free_port()
    with start_broker(port, prefer="mosquitto", data_dir=tmp_path, fallback=False) as broker:
        assert broker.kind == "mosquitto" and broker.port == port
        assert broker.url == f"mqtt://127.0.0.1:{port}"
        assert port_accepts(port)
        conf = (tmp_path / "mosquitto.conf").read_text().splitlines()
        assert f"listener {port} 127.0.0.1" in conf
        assert "max_queued_messages 10000" in conf and "persistence false" in conf
        payload = bytes(range(256)) * 400
        assert _round_trip(broker.url, payload) == payload
    assert not broker.running
    assert not port_accepts(port)
    broker.stop()  # a second stop is harmless


@pytest.mark.broker
def test_mosquitto_startup_failure_reports_its_stderr(tmp_path: Path) -> None:
    with pytest.raises(TransportError, match="exited with code") as info:
        start_broker(prefer="mosquitto", data_dir=tmp_path, extra_config="no_such_option 7")
    assert "no_such_option" in str(info.value)  # mosquitto's own complaint is included


@pytest.mark.broker
def test_port_in_use_is_refused(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(TransportError, match="already in use"):
            start_broker(port, prefer="mosquitto", data_dir=tmp_path)


def test_falls_back_to_the_embedded_broker_without_mosquitto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))  # no mosquitto to be found
    with pytest.raises(TransportError, match="not on PATH"):
        start_broker(prefer="mosquitto", data_dir=tmp_path / "strict", fallback=False)
    with start_broker(prefer="mosquitto", data_dir=tmp_path / "demo") as broker:
        assert broker.kind == "embedded"
        assert 'listen = "127.0.0.1:' in (tmp_path / "demo" / "rumqttd.toml").read_text()
        payload = random.Random(1).randbytes(100 * 1024)  # 5x rumqttd's default cap
        assert _round_trip(broker.url, payload) == payload
    assert not port_accepts(broker.port)


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
