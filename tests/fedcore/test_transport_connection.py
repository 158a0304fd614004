"""ConnectionWatch: what a service logs about its broker connection and when it gives up."""

from __future__ import annotations

import logging

import pytest

from fedcore.errors import EXIT_CODES
from fedcore.transport.base import (
    Connected,
    ConnectFailed,
    Disconnected,
    MessageReceived,
    PublishDenied,
    SubscriptionRefused,
)
from fedcore.transport.connection import ConnectionWatch, State, Verdict
from fedcore.transport.memory import MemoryBroker, MemoryTransport

URL = "mqtts://broker.plant:8883"
STATUS = "fg/plant/status/gw1"
UPDATE = "fg/plant/wind/update/gw1"
ROUND = "fg/plant/wind/round"


def watch(timeout: float | None = 60.0) -> ConnectionWatch:
    return ConnectionWatch(URL, timeout, started_at=100.0, identity="gw1",
                           own_topics=(STATUS, UPDATE, ROUND))


def refused(retry: float | None = 1.5) -> ConnectFailed:
    return ConnectFailed(URL, "connection refused by broker.plant:8883", False, retry_in_s=retry)


def test_exit_codes_are_documented_in_errors() -> None:
    assert {69, 77, 78} <= set(EXIT_CODES)
    assert "not authorized" in EXIT_CODES[77]


def test_transient_failure_at_startup_is_logged_with_url_reason_and_retry() -> None:
    w = watch()
    verdict = w.handle(refused(1.5), now=110.0)
    assert verdict is not None and verdict.exit_code is None
    assert verdict.level == logging.WARNING
    assert URL in verdict.message and "connection refused" in verdict.message
    assert "retrying in 1.5 s" in verdict.message and "within 50 s" in verdict.message
    assert "\n" not in verdict.message
    assert w.state is State.STARTING


def test_no_connection_within_the_startup_timeout_exits_69() -> None:
    w = watch(timeout=60.0)
    w.handle(refused(), now=101.0)
    assert w.check(now=159.9) is None
    verdict = w.check(now=160.0)
    assert verdict is not None and verdict.exit_code == 69
    assert "within 60 s" in verdict.message and "connection refused" in verdict.message
    assert w.state is State.GAVE_UP
    assert w.handle(refused(), now=161.0) is None  # giving up is final
    assert w.check(now=200.0) is None


def test_a_failure_after_the_deadline_gives_up_rather_than_retrying() -> None:
    w = watch(timeout=10.0)
    verdict = w.handle(refused(), now=120.0)
    assert verdict is not None and verdict.exit_code == 69


def test_without_a_startup_timeout_the_watch_waits_forever() -> None:
    w = watch(timeout=None)
    verdict = w.handle(refused(), now=1e9)
    assert verdict is not None and verdict.exit_code is None and "exit 69" not in verdict.message
    assert w.check(now=1e12) is None


@pytest.mark.parametrize(
    ("failure", "code"),
    [
        (ConnectFailed(URL, "cannot verify the broker's certificate with broker.ca_file x", True), 78),
        (ConnectFailed(URL, "the broker refused our client certificate: it is revoked", True, True), 77),
        (ConnectFailed(URL, "the broker refused the connection: CONNACK 135 (not authorized)", True, True), 77),
    ],
)
def test_permanent_failure_at_startup_gives_up_at_once(failure: ConnectFailed, code: int) -> None:
    w = watch()
    verdict = w.handle(failure, now=100.5)
    assert verdict is not None
    assert verdict == Verdict(logging.ERROR, verdict.message, code)
    assert failure.reason in verdict.message and URL in verdict.message
    assert f"exit {code}" in verdict.message
    assert w.state is State.GAVE_UP


def test_after_a_first_connection_losses_are_retried_forever_even_permanent_ones() -> None:
    w = watch(timeout=10.0)
    connected = w.handle(Connected(False), now=101.0)
    assert connected == Verdict(logging.INFO, f"connected to {URL}")
    lost = w.handle(Disconnected("connection lost: Unspecified error"), now=200.0)
    assert lost is not None and lost.exit_code is None and "lost the connection" in lost.message
    assert w.state is State.RECONNECTING
    for t, failure in ((205.0, refused()), (260.0, ConnectFailed(URL, "it is revoked", True, True, 30.0))):
        verdict = w.handle(failure, now=t)
        assert verdict is not None and verdict.exit_code is None
        assert "cannot reconnect" in verdict.message and failure.reason in verdict.message
    assert verdict is not None and verdict.level == logging.ERROR
    assert "needs an operator" in verdict.message
    assert "offline for 60 s" in verdict.message
    assert w.check(now=10_000.0) is None  # the startup deadline no longer applies
    back = w.handle(Connected(True), now=300.0)
    assert back is not None and back.message == f"reconnected to {URL} after 100 s offline"
    assert w.state is State.CONNECTED and w.connected_once


def test_connected_after_failures_says_how_many() -> None:
    w = watch()
    w.handle(refused(), now=101.0)
    w.handle(refused(), now=103.0)
    verdict = w.handle(Connected(False), now=104.0)
    assert verdict is not None and verdict.message == f"connected to {URL} after 2 failed attempts"


@pytest.mark.parametrize("topic", [STATUS, UPDATE])
def test_denied_publish_on_an_own_topic_is_permanent_and_names_the_id(topic: str) -> None:
    w = watch()
    w.handle(Connected(False), now=101.0)
    verdict = w.handle(PublishDenied(topic, 135), now=102.0)
    assert verdict is not None and verdict.exit_code == 77 and verdict.level == logging.ERROR
    assert topic in verdict.message and "not authorized (135)" in verdict.message
    assert "the configured id 'gw1' differs from the name in the client certificate" in verdict.message
    assert w.state is State.GAVE_UP


def test_refused_own_subscription_is_permanent() -> None:
    w = watch()
    w.handle(Connected(False), now=101.0)
    verdict = w.handle(SubscriptionRefused(ROUND, 135), now=102.0)
    assert verdict is not None and verdict.exit_code == 77 and ROUND in verdict.message


def test_other_denials_are_only_logged() -> None:
    w = watch()
    w.handle(Connected(False), now=101.0)
    other = w.handle(PublishDenied("fg/plant/wind/model", 135), now=102.0)
    too_big = w.handle(PublishDenied(UPDATE, 149), now=103.0)  # not an ACL problem
    refused_sub = w.handle(SubscriptionRefused("fg/plant/+/metrics", 135), now=104.0)
    for verdict in (other, too_big, refused_sub):
        assert verdict is not None and verdict.exit_code is None and verdict.level == logging.WARNING
    assert w.state is State.CONNECTED


def test_wildcard_own_topics_match_published_topics() -> None:
    w = ConnectionWatch(URL, 60.0, started_at=0.0, own_topics=("fg/plant/+/update/gw1",))
    verdict = w.handle(PublishDenied(UPDATE, 135), now=1.0)
    assert verdict is not None and verdict.exit_code == 77


def test_messages_and_a_clean_stop_say_nothing() -> None:
    w = watch()
    w.handle(Connected(False), now=101.0)
    assert w.handle(MessageReceived(ROUND, b"x", False), now=102.0) is None
    assert w.handle(Disconnected("stopped"), now=103.0) is None
    assert w.state is State.CONNECTED


def test_with_the_memory_transport_a_revoked_certificate_stops_the_service() -> None:
    """The runtime's loop in miniature: events from the in-memory transport into the watch."""
    broker = MemoryBroker()
    broker.refuse_connections("the broker refused our client certificate: it is revoked",
                              permanent=True, not_authorized=True, client_id="gw1")
    events: list[object] = []
    MemoryTransport(broker, "gw1", url=URL).start(events.append)
    [event] = events
    assert isinstance(event, ConnectFailed)
    verdict = watch().handle(event, now=100.0)
    assert verdict is not None and verdict.exit_code == 77


def test_with_the_memory_transport_an_acl_denial_on_the_status_topic_stops_the_service() -> None:
    broker = MemoryBroker(authorize=lambda cid, action, topic: topic.endswith("/gw-other"))
    events: list[object] = []
    transport = MemoryTransport(broker, "gw1", url=URL)
    transport.start(events.append)
    transport.publish(STATUS, b"online", qos=1, retain=True)
    w = watch()
    verdicts = [w.handle(e, now=101.0) for e in events]  # type: ignore[arg-type]
    assert [v.exit_code for v in verdicts if v is not None] == [None, 77]
