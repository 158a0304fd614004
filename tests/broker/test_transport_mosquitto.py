"""The paho transport against a real Mosquitto on a loopback port."""

from __future__ import annotations

import random
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedcore.errors import TransportError
from fedcore.transport.base import (
    Connected,
    Disconnected,
    MessageReceived,
    PayloadTooLargeError,
    PublishDenied,
    Will,
    publish_packet_size,
)
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker, mosquitto_config
from tests.broker.test_connect_failures import make_tls_fleet
from tests.conftest import EventLog

pytestmark = pytest.mark.broker

Factory = Callable[..., PahoTransport]


@pytest.fixture
def transport(topic_prefix: str) -> Iterator[Factory]:
    """``transport(url, name, **kwargs)`` -> a PahoTransport stopped at teardown."""
    made: list[PahoTransport] = []

    def make(url: str, name: str, **kwargs: object) -> PahoTransport:
        kwargs.setdefault("rng", random.Random(len(made)))
        kwargs.setdefault("backoff_min", 0.05)
        kwargs.setdefault("backoff_max", 0.5)
        client_id = f"{topic_prefix.replace('/', '-')}-{name}"
        t = PahoTransport(url, client_id, **kwargs)  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


class RecordingRandom(random.Random):
    """Records the ranges the reconnect backoff draws from."""

    def __init__(self, seed: int) -> None:
        super().__init__(seed)
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return super().uniform(a, b)


def connect(t: PahoTransport, log: EventLog, session_present: bool | None = None) -> Connected:
    t.start(log)
    event = log.wait_for(Connected)
    if session_present is not None:
        assert event.session_present is session_present
    return event


def test_qos1_publish_subscribe_and_byte_counters(
    mosquitto: RunningBroker, transport: Factory, topic_prefix: str, events: Callable[[], EventLog]
) -> None:
    sub_log, pub_log = events(), events()
    sub = transport(mosquitto.url, "sub")
    pub = transport(mosquitto.url, "pub")
    connect(sub, sub_log, session_present=False)
    connect(pub, pub_log)
    sub.subscribe(f"{topic_prefix}/+/update/+")
    # A retained probe proves the subscription is active before the real publishes.
    pub.publish(f"{topic_prefix}/x/update/probe", b"p", retain=True, wait=5)
    sub_log.messages(1)
    sent_before, received_before = pub.bytes_sent, sub.bytes_received
    payloads = [bytes([i]) * (1000 + i) for i in range(20)]
    for i, payload in enumerate(payloads):
        result = pub.publish(f"{topic_prefix}/t/update/d{i}", payload, qos=1, wait=5)
        assert result.reason_code == 0 and not result.denied
    got = sub_log.messages(21)[1:]
    assert [m.payload for m in got] == payloads
    assert all(not m.retained for m in got)
    # Counters include at least every PUBLISH packet (plus acks and pings).
    publish_bytes = sum(
        publish_packet_size(m.topic, len(m.payload), 1) for m in got
    )
    assert pub.bytes_sent - sent_before >= publish_bytes
    assert sub.bytes_received - received_before >= publish_bytes
    pub.publish(f"{topic_prefix}/x/update/probe", b"", retain=True, wait=5)


def test_retained_message_reaches_a_late_subscriber(
    mosquitto: RunningBroker, transport: Factory, topic_prefix: str, events: Callable[[], EventLog]
) -> None:
    pub_log, late_log = events(), events()
    pub = transport(mosquitto.url, "aggregator")
    connect(pub, pub_log)
    pub.publish(f"{topic_prefix}/model", b"model-v1", retain=True, wait=5)
    pub.publish(f"{topic_prefix}/model", b"model-v2", retain=True, wait=5)
    late = transport(mosquitto.url, "late")
    connect(late, late_log)
    late.subscribe(f"{topic_prefix}/#")
    [message] = late_log.messages(1)
    assert message == MessageReceived(f"{topic_prefix}/model", b"model-v2", retained=True)
    pub.publish(f"{topic_prefix}/model", b"", retain=True, wait=5)


_CHILD = textwrap.dedent(
    """
    import queue, random, sys, time
    from fedcore.transport.base import Connected, Will
    from fedcore.transport.paho import PahoTransport
    url, client_id, topic = sys.argv[1:4]
    q = queue.Queue()
    t = PahoTransport(url, client_id, will=Will(topic, b"offline", 1, True),
                      keepalive=60, rng=random.Random(0))
    t.start(q.put)
    while not isinstance(q.get(timeout=10), Connected):
        pass
    t.publish(topic, b"online", retain=True, wait=5)
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_last_will_is_published_when_a_client_is_killed_not_when_stopped(
    mosquitto: RunningBroker, transport: Factory, topic_prefix: str, events: Callable[[], EventLog]
) -> None:
    log = events()
    watcher = transport(mosquitto.url, "watcher")
    connect(watcher, log)
    watcher.subscribe(f"{topic_prefix}/status/+")
    status = f"{topic_prefix}/status/edge1"
    root = Path(__file__).resolve().parents[2]
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, mosquitto.url, f"{topic_prefix}-edge1".replace("/", "-"), status],
        stdout=subprocess.PIPE, cwd=root,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        child.kill()  # no DISCONNECT: the broker must publish the will
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    got = log.messages(2)
    assert [(m.topic, m.payload) for m in got] == [(status, b"online"), (status, b"offline")]

    # A clean stop sends DISCONNECT: no will.
    clean_log = events()
    clean_status = f"{topic_prefix}/status/edge2"
    clean = transport(mosquitto.url, "edge2", will=Will(clean_status, b"offline", 1, False))
    connect(clean, clean_log)
    clean.publish(clean_status, b"bye", wait=5)
    clean.stop()
    # The marker is published after the stop; had a will been sent it would arrive first.
    watcher_pub = transport(mosquitto.url, "marker")
    connect(watcher_pub, events())
    watcher_pub.publish(f"{topic_prefix}/status/marker", b"end", wait=5)
    tail = [(m.topic, m.payload) for m in log.messages(4)[2:]]
    assert tail == [(clean_status, b"bye"), (f"{topic_prefix}/status/marker", b"end")]
    watcher.publish(status, b"", retain=True, wait=5)


def test_offline_subscriber_gets_qos1_messages_after_reconnect(
    mosquitto: RunningBroker, transport: Factory, topic_prefix: str, events: Callable[[], EventLog]
) -> None:
    first_log = events()
    first = transport(mosquitto.url, "agg")
    connect(first, first_log, session_present=False)
    first.subscribe(f"{topic_prefix}/update/+", qos=1)
    pub_log = events()
    pub = transport(mosquitto.url, "edge")
    connect(pub, pub_log)
    pub.publish(f"{topic_prefix}/update/probe", b"probe", retain=True, wait=5)
    first_log.messages(1)  # the retained probe proves the subscription is in place
    first.stop()  # clean disconnect; the session (expiry 3600 s) stays on the broker
    sent = [f"update {i}".encode() for i in range(10)]
    for i, payload in enumerate(sent):
        pub.publish(f"{topic_prefix}/update/d{i}", payload, qos=1, wait=5)
    again_log = events()
    again = transport(mosquitto.url, "agg")  # same client id, new process-like object
    connect(again, again_log, session_present=True)
    assert [m.payload for m in again_log.messages(10)] == sent


def test_oversized_publish_is_refused_with_a_clear_error(
    mosquitto_factory: Callable[..., RunningBroker], transport: Factory, topic_prefix: str,
    events: Callable[[], EventLog],
) -> None:
    broker = mosquitto_factory(extra_config="max_packet_size 2000")
    log = events()
    t = transport(broker.url, "big", max_payload=1_000_000)
    connect(t, log)
    t.subscribe(f"{topic_prefix}/#")
    topic = f"{topic_prefix}/chunk"
    limit = t.payload_limit(topic)
    assert publish_packet_size(topic, limit, 1) == 2000  # from CONNACK Maximum Packet Size
    with pytest.raises(PayloadTooLargeError, match=r"exceeds the limit of \d+ bytes") as info:
        t.publish(topic, b"x" * (limit + 1), wait=5)
    assert info.value.payload_size == limit + 1 and info.value.limit == limit
    assert t.publish(topic, b"y" * limit, wait=5).reason_code == 0
    [message] = log.messages(1)
    assert len(message.payload) == limit
    assert log.wait_for(Connected) == log.events[0]  # no reconnect loop happened

    # Without a broker limit, the configured one applies.
    small = transport(broker.url, "small", max_payload=100)
    connect(small, events())
    assert small.payload_limit(topic) == 100
    with pytest.raises(PayloadTooLargeError):
        small.publish(topic, b"z" * 101)


def test_acl_denial_returns_reason_135(
    mosquitto_factory: Callable[..., RunningBroker], transport: Factory, tmp_path: Path,
    topic_prefix: str, events: Callable[[], EventLog],
) -> None:
    acl = tmp_path / "acl"
    acl.write_text(f"topic readwrite {topic_prefix}/allowed/#\n")
    broker = mosquitto_factory(extra_config=f"acl_file {acl}")
    log = events()
    t = transport(broker.url, "dev")
    connect(t, log)
    allowed = t.publish(f"{topic_prefix}/allowed/x", b"ok", wait=5)
    assert allowed.reason_code == 16 and not allowed.denied  # accepted, no subscribers
    denied = t.publish(f"{topic_prefix}/forbidden", b"no", wait=5)
    assert denied.denied and denied.reason_code == 135
    # Reported as an event too, with the topic, whether or not the publisher waits.
    t.publish(f"{topic_prefix}/forbidden/again", b"no")
    assert log.wait_for(PublishDenied) == PublishDenied(f"{topic_prefix}/forbidden", 135)
    log.wait_for(PublishDenied, lambda e: e.topic == f"{topic_prefix}/forbidden/again")
    assert not any(isinstance(e, PublishDenied) and "allowed" in e.topic for e in log.events)


def test_reconnects_and_resubscribes_after_broker_restart(
    mosquitto_factory: Callable[..., RunningBroker], transport: Factory, topic_prefix: str,
    events: Callable[[], EventLog],
) -> None:
    broker = mosquitto_factory()
    sub_log, pub_log = events(), events()
    rng = RecordingRandom(5)
    sub = transport(broker.url, "sub", rng=rng, backoff_min=0.05, backoff_max=0.4)
    pub = transport(broker.url, "pub")
    connect(sub, sub_log)
    connect(pub, pub_log)
    sub.subscribe(f"{topic_prefix}/#")
    pub.publish(f"{topic_prefix}/before", b"1", retain=True, wait=5)  # retained: no race
    sub_log.messages(1)

    mark = len(sub_log)
    broker.restart()  # same port; persistence off: sessions are gone
    sub_log.wait_for(Disconnected, after=mark)
    assert sub_log.wait_for(Connected, after=mark) == Connected(session_present=False)
    pub_log.wait_for(Connected, after=1)
    # The subscription was restored without the caller doing anything. Retained, so it
    # arrives whether the re-SUBSCRIBE reaches the broker before or after this publish.
    pub.publish(f"{topic_prefix}/after", b"2", retain=True, wait=5)
    assert [m.payload for m in sub_log.messages(2)] == [b"1", b"2"]
    # The waits between attempts came from our jittered backoff, starting at its minimum.
    assert rng.ranges and rng.ranges[0] == (0.025, 0.05)
    assert all(hi <= 0.4 for _, hi in rng.ranges)


def test_publish_wait_times_out_while_the_broker_is_down(
    mosquitto_factory: Callable[..., RunningBroker], transport: Factory, topic_prefix: str,
    events: Callable[[], EventLog],
) -> None:
    broker = mosquitto_factory()
    log = events()
    t = transport(broker.url, "lonely", backoff_min=5, backoff_max=10)
    connect(t, log)
    broker.stop()
    log.wait_for(Disconnected)
    with pytest.raises(TransportError, match="no PUBACK"):
        t.publish(f"{topic_prefix}/x", b"x", wait=0.2)


def nodelay(t: PahoTransport) -> int:
    """TCP_NODELAY of the transport's live socket (for TLS, the TCP socket under it)."""
    sock = t._client.socket()  # the adapter's own socket: nothing public exposes it
    assert isinstance(sock, socket.socket)  # ssl.SSLSocket for TLS
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_tcp_nodelay_is_set_on_plain_and_tls_connections(
    mosquitto: RunningBroker, mosquitto_factory: Callable[..., RunningBroker],
    transport: Factory, tmp_path: Path, events: Callable[[], EventLog],
) -> None:
    plain = transport(mosquitto.url, "plain")
    connect(plain, events())
    assert nodelay(plain) == 1

    fleet = make_tls_fleet(tmp_path / "fleet")
    broker = mosquitto_factory(extra_config=fleet.listener())
    log = events()
    secure = transport(f"mqtts://127.0.0.1:{broker.port}", "secure", tls=fleet.tls(fleet.bundle("gw1")))
    connect(secure, log)
    assert nodelay(secure) == 1
    mark = len(log)
    broker.restart()  # a new socket for the reconnect: set there too
    log.wait_for(Connected, after=mark)
    assert nodelay(secure) == 1
    # The demo broker sets it on its side (it belongs on both ends).
    assert "set_tcp_nodelay true" in mosquitto_config(1883, tmp_path).splitlines()


def test_the_client_announces_its_maximum_packet_size(
    mosquitto: RunningBroker, transport: Factory, topic_prefix: str, events: Callable[[], EventLog],
) -> None:
    """A broker without a size limit (the shared test broker has none) forwards nothing
    larger than the receiver announced: an oversized message never reaches its memory."""
    small_log, big_log = events(), events()
    small = transport(mosquitto.url, "small-inbox", max_payload=100_000)
    big = transport(mosquitto.url, "big-sender", max_payload=2_000_000)
    connect(small, small_log)
    connect(big, big_log)
    small.subscribe(f"{topic_prefix}/#")
    big.subscribe(f"{topic_prefix}/#")
    topic = f"{topic_prefix}/x"
    big.publish(topic, b"L" * 1_000_000, wait=5)  # the broker takes it (no limit of its own)
    big.publish(topic, b"s" * 1_000, wait=5)
    assert [len(m.payload) for m in big_log.messages(2)] == [1_000_000, 1_000]
    [message] = small_log.messages(1)  # only the small one was handed over
    assert message.payload == b"s" * 1_000
