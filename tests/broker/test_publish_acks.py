"""PUBACKs reported as events (``report_acks``) by the paho transport against a real
Mosquitto: what the gateway's spool relies on to let a message go."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest

from fedcore.transport.base import Connected, Disconnected, PublishAcknowledged
from fedcore.transport.paho import PahoTransport
from tests.conftest import EventLog

pytestmark = pytest.mark.broker


def client(url: str, name: str, **kwargs: object) -> PahoTransport:
    return PahoTransport(url, name, backoff_min=0.05, backoff_max=0.5, rng=random.Random(7),
                         **kwargs)  # type: ignore[arg-type]


def test_each_puback_is_reported_with_the_packet_id_publish_returned(
        mosquitto, topic_prefix: str, events: Callable[[], EventLog]) -> None:
    log = events()
    sender = client(mosquitto.url, f"{topic_prefix.replace('/', '-')}-acks", report_acks=True)
    sender.start(log)
    try:
        log.wait_for(Connected)
        mids = [sender.publish(f"{topic_prefix}/m{i}", b"x", qos=1).mid for i in range(3)]
        acks = [log.wait_for(PublishAcknowledged, lambda e, m=m: e.mid == m) for m in mids]  # type: ignore[misc]
        # 16: no matching subscribers; the broker took it all the same
        assert all(a.reason_code in (0, 16) and not a.refused for a in acks)
    finally:
        sender.stop()


def test_without_report_acks_no_ack_events(mosquitto, topic_prefix: str,
                                           events: Callable[[], EventLog]) -> None:
    log = events()
    sender = client(mosquitto.url, f"{topic_prefix.replace('/', '-')}-quiet")
    sender.start(log)
    try:
        log.wait_for(Connected)
        sender.publish(f"{topic_prefix}/m", b"x", qos=1, wait=5)
        assert not any(isinstance(e, PublishAcknowledged) for e in log.events)
    finally:
        sender.stop()


def test_a_message_published_while_the_broker_is_down_is_acked_under_the_same_packet_id(
        mosquitto_factory, topic_prefix: str, events: Callable[[], EventLog]) -> None:
    """paho keeps an unacknowledged QoS 1 message and sends it after reconnecting with the
    packet id publish() returned: the spool's in-flight map stays valid across a drop."""
    broker = mosquitto_factory()
    log = events()
    topic = f"{topic_prefix}/update"
    sender = client(broker.url, f"{topic_prefix.replace('/', '-')}-sender", report_acks=True)
    sender.start(log)
    try:
        log.wait_for(Connected)
        broker.kill()
        log.wait_for(Disconnected)
        result = sender.publish(topic, b"while down", qos=1)
        time.sleep(0.2)
        assert not any(isinstance(e, PublishAcknowledged) for e in log.events)
        broker.start()
        ack = log.wait_for(PublishAcknowledged, lambda e: e.mid == result.mid, timeout=20)
        assert not ack.refused
        assert [e.mid for e in log.events if isinstance(e, PublishAcknowledged)] == [result.mid]
    finally:
        sender.stop()
