"""Operator identities on a real Mosquitto: they read what ``operator_read`` grants and write nothing.

A fleet with two gateways, the aggregator and an operator is provisioned into a folder
Mosquitto's account can pass; the broker runs the generated conf and ACL (as root it
switches to ``mosquitto``). ``kill -HUP`` makes Mosquitto re-read the ACL (and the CRL):
an operator provisioned while the broker runs can read only after it, and a revoked one
is refused after it.
"""

from __future__ import annotations

import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedcore.protocol.topics import Topics
from fedcore.transport.base import MessageReceived
from fedcore.transport.paho import PahoTransport
from fedgate import provision
from tests.broker.test_broker_command import (
    NOT_AUTHORIZED,
    WAIT,
    MosquittoProcess,
    connect,
    free_port,
    workdir,  # noqa: F401  (fixture)
)
from tests.conftest import EventLog

pytestmark = pytest.mark.broker

FLEET = "plant"


@dataclass
class Fleet:
    root: Path
    broker: MosquittoProcess
    clients: list[PahoTransport]

    def connect(self, bundle: str) -> tuple[PahoTransport, EventLog]:
        transport, log = connect(self.broker.port, self.root / bundle, f"t-{uuid.uuid4().hex[:10]}")
        self.clients.append(transport)
        return transport, log


@pytest.fixture
def fleet(workdir: Path) -> Iterator[Fleet]:  # noqa: F811
    root = workdir / "fleet"
    provision.init_ca(root, fleet=FLEET)
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    provision.provision_operator(root, "ops")
    port = free_port()
    conf = provision.provision_broker(root, port=port)
    broker = MosquittoProcess(["mosquitto", "-c", str(conf)], workdir, port, workdir / "mosquitto.log")
    running = Fleet(root, broker, [])
    try:
        broker.start()
        yield running
    finally:
        for client in running.clients:
            client.stop()
        broker.stop()


def unique_topics() -> Topics:
    return Topics(FLEET, f"t{uuid.uuid4().hex[:8]}")


def wait_for_message(log: EventLog, topic: str, after: int = 0, timeout: float = WAIT) -> MessageReceived:
    return log.wait_for(MessageReceived, lambda m: m.topic == topic, after=after, timeout=timeout)


def eventually(check: Callable[[], bool], what: str) -> None:
    """A reload is a signal: poll the behaviour it should change until it shows."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def refused(port: int, bundle: Path) -> bool:
    """True when the broker turns the bundle away (TLS alert or CONNACK failure)."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}",
                         protocol=mqtt.MQTTv5)
    client.tls_set(ca_certs=str(bundle / "ca.crt"), certfile=str(bundle / "client.crt"),
                   keyfile=str(bundle / "client.key"))
    try:
        client.connect("127.0.0.1", port, keepalive=30)
        for _ in range(int(WAIT / 0.1)):
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                return True
            if client.is_connected():
                return False
        raise AssertionError("the broker neither accepted nor refused the connection")
    except OSError:  # ssl.SSLError: the handshake or the first read failed
        return True
    finally:
        client.disconnect()


def test_operator_reads_retained_fleet_state_but_not_updates(fleet: Fleet) -> None:
    topics = unique_topics()
    aggregator, _ = fleet.connect("aggregator")
    gw1, _ = fleet.connect("devices/gw1")
    retained = {
        topics.status("gw1"): (gw1, b"gw1 online"),
        topics.metrics(): (aggregator, b"metrics"),
        topics.state(): (aggregator, b"state"),
        topics.deployment(): (aggregator, b"deployment"),
        topics.deployed(): (aggregator, b"deployed model"),
    }
    for topic, (sender, payload) in retained.items():
        assert not sender.publish(topic, payload, retain=True, wait=WAIT).denied, topic

    operator, seen = fleet.connect("operators/ops")
    operator.subscribe(topics.updates_filter())  # first: it is in place once the rest answer
    for topic in retained:
        operator.subscribe(topic)
    for topic, (_, payload) in retained.items():
        assert wait_for_message(seen, topic).payload == payload

    # An update crosses the broker to the aggregator's side but never to the operator:
    # a later message on a topic it reads arrives, the update before it did not.
    assert not gw1.publish(topics.update("gw1"), b"private delta", wait=WAIT).denied
    assert not aggregator.publish(topics.metrics(), b"marker", wait=WAIT).denied
    marker = wait_for_message(seen, topics.metrics(), after=len(retained))
    assert marker.payload == b"marker"
    assert not [m for m in seen.messages(len(retained) + 1) if "/update/" in m.topic]


def test_every_operator_publish_is_refused(fleet: Fleet) -> None:
    topics = unique_topics()
    operator, _ = fleet.connect("operators/ops")
    every_topic = [
        topics.round(), topics.model(), topics.metrics(), topics.deployment(), topics.deployed(),
        topics.state(),
    ]
    for device in ("ops", "gw1"):  # its own name in the device subtree, and a real gateway's
        every_topic += [
            topics.update(device), topics.secagg("keys", device), topics.status(device),
            topics.telemetry(device),
        ]
    for topic in every_topic:
        assert operator.publish(topic, b"x", wait=WAIT).reason_code == NOT_AUTHORIZED, topic


def test_hup_rereads_the_acl_for_a_new_operator_and_the_crl_for_a_revoked_one(fleet: Fleet) -> None:
    topics = unique_topics()
    aggregator, _ = fleet.connect("aggregator")
    assert not aggregator.publish(topics.state(), b"state", retain=True, wait=WAIT).denied
    assert not aggregator.publish(topics.round(), b"round", retain=True, wait=WAIT).denied

    bundle = provision.provision_operator(fleet.root, "late")
    assert "user late" in (fleet.root / "broker" / "acl").read_text().splitlines()
    stolen = fleet.root.parent / "late-copy"
    shutil.copytree(bundle, stolen)
    late, seen = fleet.connect("operators/late")
    # Subscriptions are handled in order: the retained round (shared with every client)
    # arriving first shows that the retained state was withheld under the old ACL.
    late.subscribe(topics.state())
    late.subscribe(topics.round())
    assert seen.messages(1)[0].topic == topics.round()

    fleet.broker.reload()

    def state_delivered() -> bool:
        before = len(seen)
        late.subscribe(topics.state())  # a new SUBSCRIBE re-sends retained messages
        try:
            return wait_for_message(seen, topics.state(), after=before, timeout=0.5).payload == b"state"
        except AssertionError:
            return False

    eventually(state_delivered, "the new operator reads nothing after kill -HUP")

    assert provision.revoke(fleet.root, "late") == "operator"
    assert "user late" not in (fleet.root / "broker" / "acl").read_text().splitlines()
    fleet.broker.reload()
    eventually(lambda: refused(fleet.broker.port, stolen), "the revoked operator connects after kill -HUP")
