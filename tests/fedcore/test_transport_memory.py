"""The in-memory broker and transport behave like Mosquitto + the paho transport."""

from __future__ import annotations

import random

import pytest

from fedcore.errors import LocalProtocolError, TransportError
from fedcore.transport.base import (
    Connected,
    ConnectFailed,
    Disconnected,
    MessageReceived,
    PayloadTooLargeError,
    PublishDenied,
    SubscriptionRefused,
    TransportEvent,
    Will,
    publish_packet_size,
)
from fedcore.transport.memory import MemoryBroker, MemoryTransport


class Client:
    """A transport plus the list of events it delivered."""

    def __init__(self, broker: MemoryBroker, client_id: str, **kwargs: object) -> None:
        self.events: list[TransportEvent] = []
        self.t = MemoryTransport(broker, client_id, **kwargs)  # type: ignore[arg-type]
        self.t.start(self.events.append)

    def messages(self) -> list[tuple[str, bytes, bool]]:
        return [(e.topic, e.payload, e.retained) for e in self.events if isinstance(e, MessageReceived)]


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker()


def test_start_reports_connected_and_wildcards_route(broker: MemoryBroker) -> None:
    sub = Client(broker, "sub")
    pub = Client(broker, "pub")
    assert sub.events == [Connected(session_present=False)]
    sub.t.subscribe("fg/f/+/update/+")
    sub.t.subscribe("fg/f/status/#")
    pub.t.publish("fg/f/t/update/d1", b"u1")
    pub.t.publish("fg/f/t/update/d1/extra", b"no")
    pub.t.publish("fg/f/status", b"s0")
    pub.t.publish("fg/g/t/update/d1", b"no")
    assert sub.messages() == [("fg/f/t/update/d1", b"u1", False), ("fg/f/status", b"s0", False)]


def test_overlapping_filters_give_one_copy(broker: MemoryBroker) -> None:
    sub = Client(broker, "sub")
    sub.t.subscribe("a/#")
    sub.t.subscribe("a/+")
    Client(broker, "pub").t.publish("a/b", b"x")
    assert sub.messages() == [("a/b", b"x", False)]


def test_retained_goes_to_late_subscribers_and_empty_payload_deletes(broker: MemoryBroker) -> None:
    pub = Client(broker, "pub")
    pub.t.publish("m/model", b"v1", retain=True)
    pub.t.publish("m/model", b"v2", retain=True)
    late = Client(broker, "late")
    late.t.subscribe("m/#")
    assert late.messages() == [("m/model", b"v2", True)]
    pub.t.publish("m/model", b"v3", retain=True)  # live delivery: retain flag off
    assert late.messages()[-1] == ("m/model", b"v3", False)
    pub.t.publish("m/model", b"", retain=True)
    later = Client(broker, "later")
    later.t.subscribe("m/#")
    assert later.messages() == []


def test_offline_persistent_session_gets_qos1_but_not_qos0(broker: MemoryBroker) -> None:
    sub = Client(broker, "agg")
    sub.t.subscribe("u/#", qos=1)
    sub.t.drop_connection()
    pub = Client(broker, "edge")
    pub.t.publish("u/1", b"q1", qos=1)
    pub.t.publish("u/2", b"q0", qos=0)
    assert broker.queued_for("agg") == 1
    sub.t.reconnect()
    assert Connected(session_present=True) in sub.events
    assert sub.messages() == [("u/1", b"q1", False)]


def test_subscription_qos_caps_delivery_qos(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.subscribe("u/#", qos=0)
    sub.t.drop_connection()
    Client(broker, "p").t.publish("u/1", b"q1", qos=1)
    assert broker.queued_for("s") == 0


def test_clean_start_and_zero_expiry_lose_the_session(broker: MemoryBroker) -> None:
    first = Client(broker, "x", session_expiry=0)
    first.t.subscribe("a")
    first.t.stop()
    Client(broker, "p").t.publish("a", b"lost")
    again = Client(broker, "x")
    assert again.events == [Connected(session_present=False)]
    assert again.messages() == []
    again.t.stop()
    fresh = Client(broker, "x", clean_start=True)
    assert fresh.events == [Connected(session_present=False)]


def test_subscription_added_offline_is_sent_on_reconnect(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.drop_connection()
    sub.t.subscribe("late/#")
    sub.t.reconnect()
    Client(broker, "p").t.publish("late/1", b"x")
    assert sub.messages() == [("late/1", b"x", False)]


def test_last_will_on_kill_and_on_network_loss_but_not_on_stop(broker: MemoryBroker) -> None:
    watcher = Client(broker, "watch")
    watcher.t.subscribe("status/+")
    will = Will("status/{}", b"offline", qos=1, retain=True)
    for name in ("killed", "lost", "stopped"):
        client = Client(broker, name, will=Will(will.topic.format(name), will.payload, 1, True))
        if name == "killed":
            client.t.kill()
        elif name == "lost":
            client.t.drop_connection()
            assert client.events[-1] == Disconnected("connection lost: network")
        else:
            client.t.stop()
    assert watcher.messages() == [
        ("status/killed", b"offline", False),
        ("status/lost", b"offline", False),
    ]
    assert broker.retained["status/killed"] == (b"offline", 1)


def test_oversized_publish_is_refused_before_sending(broker: MemoryBroker) -> None:
    small = MemoryBroker(max_packet_size=1000)
    sub = Client(small, "s")
    sub.t.subscribe("#")
    pub = Client(small, "p", max_payload=100_000)
    limit = pub.t.payload_limit("big/topic")
    assert publish_packet_size("big/topic", limit, 1) == 1000
    pub.t.publish("big/topic", b"x" * limit)
    with pytest.raises(PayloadTooLargeError, match="exceeds the limit of") as info:
        pub.t.publish("big/topic", b"x" * (limit + 1))
    assert info.value.limit == limit
    assert len(sub.messages()) == 1
    configured = Client(broker, "c", max_payload=10)
    with pytest.raises(PayloadTooLargeError):
        configured.t.publish("t", b"x" * 11)


def test_acl_denial_is_visible(broker: MemoryBroker) -> None:
    acl = MemoryBroker(authorize=lambda cid, action, topic: topic.endswith(cid))
    dev = Client(acl, "d1")
    assert dev.t.publish("u/d1", b"ok", wait=1.0).reason_code == 0
    result = dev.t.publish("u/d2", b"spoof", wait=1.0)
    assert result.denied and result.reason_code == 135
    assert dev.events[-1] == PublishDenied("u/d2", 135)  # reported whether or not anyone waits
    dev.t.publish("u/d3", b"spoof")
    assert dev.events[-1] == PublishDenied("u/d3", 135)
    dev.t.publish("u/d4", b"spoof", qos=0)  # QoS 0 has no PUBACK: nothing to report
    assert dev.events[-1] == PublishDenied("u/d3", 135)
    dev.t.subscribe("u/+")
    assert dev.events[-1] == SubscriptionRefused("u/+", 135)
    assert [p.topic for p in acl.history] == ["u/d1"]


def test_refused_connections_are_reported_until_accepted(broker: MemoryBroker) -> None:
    broker.refuse_connections()
    gw = Client(broker, "gw1", url="mqtts://broker:8883")
    assert gw.events == [ConnectFailed("mqtts://broker:8883", "connection refused (is the broker running?)", False)]
    assert not gw.t.connected
    gw.t.publish("fg/x", b"queued")  # QoS 1 waits in the outbox, as paho queues it
    gw.t.reconnect()  # the next attempt
    assert len(gw.events) == 2 and isinstance(gw.events[1], ConnectFailed)
    broker.accept_connections()
    watcher = Client(broker, "watcher")
    watcher.t.subscribe("fg/#")
    gw.t.reconnect()
    assert gw.events[-1] == Connected(session_present=False)
    assert watcher.messages() == [("fg/x", b"queued", False)]


def test_refusal_of_one_client_after_a_restart_models_a_revocation(broker: MemoryBroker) -> None:
    stolen, honest = Client(broker, "gw3"), Client(broker, "gw1")
    broker.refuse_connections("the broker refused our client certificate: it is revoked",
                              permanent=True, not_authorized=True, client_id="gw3")
    broker.restart()
    assert isinstance(honest.events[-1], Connected)
    assert stolen.events[-2:] == [
        Disconnected("connection lost: broker restarted"),
        ConnectFailed("mqtt://memory:1883", "the broker refused our client certificate: it is revoked",
                      True, True),
    ]
    assert broker.connected_clients() == ["gw1"]


def test_refusal_combinations_are_checked(broker: MemoryBroker) -> None:
    with pytest.raises(LocalProtocolError):
        broker.refuse_connections(not_authorized=True)  # not authorized is always permanent


def test_injected_drop_and_duplicate(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.subscribe("#")
    pub = Client(broker, "p")
    broker.inject("drop", "u/+")
    broker.inject("duplicate", "m", count=2)
    for topic in ("u/1", "u/2", "m", "m", "m"):
        pub.t.publish(topic, topic.encode())
    assert [t for t, _, _ in sub.messages()] == ["u/2", "m", "m", "m", "m", "m"]
    assert broker.dropped == 1


def test_random_faults_follow_the_rng() -> None:
    def run(seed: int) -> list[str]:
        broker = MemoryBroker(drop_rate=0.3, duplicate_rate=0.3, rng=random.Random(seed))
        sub = Client(broker, "s")
        sub.t.subscribe("#")
        pub = Client(broker, "p")
        for i in range(40):
            pub.t.publish(f"t/{i}", b"")
        return [t for t, _, _ in sub.messages()]

    got = run(7)
    assert got == run(7)
    assert len(set(got)) < 40  # some dropped
    assert len(got) > len(set(got))  # some duplicated


def test_broker_restart_loses_sessions_and_clients_resubscribe(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.subscribe("a/#")
    pub = Client(broker, "p")
    pub.t.publish("a/r", b"kept?", retain=True)
    broker.restart()
    assert sub.events[-2:] == [
        Disconnected("connection lost: broker restarted"),
        Connected(session_present=False),
    ]
    assert broker.retained == {}
    pub.t.publish("a/1", b"after")
    assert sub.messages()[-1] == ("a/1", b"after", False)


def test_publish_while_disconnected_waits_in_outbox(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.subscribe("#")
    pub = Client(broker, "p")
    pub.t.drop_connection()
    pub.t.publish("o/1", b"later", qos=1)
    pub.t.publish("o/0", b"gone", qos=0)
    with pytest.raises(TransportError, match="no PUBACK"):
        pub.t.publish("o/2", b"waited", qos=1, wait=0.1)
    assert sub.messages() == []
    pub.t.reconnect()
    assert sub.messages() == [("o/1", b"later", False), ("o/2", b"waited", False)]


def test_byte_counters_count_publish_packets(broker: MemoryBroker) -> None:
    sub = Client(broker, "s")
    sub.t.subscribe("b/#")
    pub = Client(broker, "p")
    pub.t.publish("b/1", b"x" * 100)
    assert pub.t.bytes_sent == publish_packet_size("b/1", 100, 1)
    assert sub.t.bytes_received == pub.t.bytes_sent
    assert pub.t.bytes_received == 0


def test_session_takeover_disconnects_the_old_connection(broker: MemoryBroker) -> None:
    old = Client(broker, "same")
    new = Client(broker, "same")
    assert old.events[-1] == Disconnected("connection lost: session taken over")
    assert new.events == [Connected(session_present=True)]
    assert broker.connected_clients() == ["same"]
