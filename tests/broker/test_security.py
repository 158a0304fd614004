"""Security against a real Mosquitto with real certificates and the generated config + ACL.

Each broker here is a `mosquitto -c` child on a free loopback port, rendered by
``fedgate.provision`` into a temporary fleet folder (no shared fixtures: the whole point is
to run the config the product generates).
"""

from __future__ import annotations

import os
import queue
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fedcore.errors import RemoteProtocolError
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import Kind, Status
from fedcore.protocol.topics import Topics, parse_topic
from fedgate import provision

pytestmark = pytest.mark.broker

FLEET = "plant"
TOPICS = Topics(FLEET, "wind")
NOT_AUTHORIZED = 135
WAIT = 10.0  # seconds to wait for an event that should come; never asserted on


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Broker:
    def __init__(self, conf: Path, port: int, log: Path) -> None:
        self.conf, self.port, self.log = conf, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not on PATH (apt-get install mosquitto)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=log, stderr=log)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail("mosquitto did not start listening")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=WAIT)
        self.proc = None


def make_fleet(root: Path, port: int) -> Path:
    provision.init_ca(root, fleet=FLEET)
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2", "gw3"):
        provision.provision_device(root, name)
    user = "root" if os.geteuid() == 0 else None  # as root, Mosquitto would drop to `mosquitto`
    return provision.provision_broker(root, port=port, run_as_user=user)


@dataclass
class Fleet:
    root: Path
    broker: Broker

    def bundle(self, name: str) -> Path:
        return self.root / ("aggregator" if name == "aggregator" else f"devices/{name}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("sec") / "fleet"
    port = free_port()
    conf = make_fleet(root, port)
    broker = Broker(conf, port, root.parent / "mosquitto.log")
    broker.start()
    yield Fleet(root, broker)
    broker.stop()


class Client:
    """A paho MQTT v5 client that records CONNACK, PUBACK/SUBACK reason codes and messages."""

    def __init__(self, port: int, ca: Path | None, bundle: Path | None) -> None:
        self.port = port
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"t-{uuid.uuid4().hex[:10]}", protocol=mqtt.MQTTv5
        )
        if ca is not None:
            cert = str(bundle / "client.crt") if bundle else None
            key = str(bundle / "client.key") if bundle else None
            self.client.tls_set(ca_certs=str(ca), certfile=cert, keyfile=key)
        self.connack: Any = None
        self.settled = threading.Event()
        self.acks: dict[int, Any] = {}
        self.ack_events: dict[int, threading.Event] = {}
        self.lock = threading.Lock()
        self.messages: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self.settled.set()
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_suback
        self.client.on_message = lambda c, u, msg: self.messages.put(msg)

    def _event(self, mid: int) -> threading.Event:
        with self.lock:
            return self.ack_events.setdefault(mid, threading.Event())

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, props: Any) -> None:
        self.connack = reason_code
        self.settled.set()

    def _on_ack(self, client: Any, userdata: Any, mid: int, reason_code: Any, props: Any) -> None:
        self.acks[mid] = reason_code
        self._event(mid).set()

    def _on_suback(self, client: Any, userdata: Any, mid: int, reason_codes: Any, props: Any) -> None:
        self.acks[mid] = reason_codes
        self._event(mid).set()

    def connect(self) -> bool:
        """True only if the broker accepted the connection (CONNACK success)."""
        try:
            self.client.connect("127.0.0.1", self.port, keepalive=30)
        except OSError:  # ssl.SSLError is an OSError: handshake refused
            return False
        self.client.loop_start()
        self.settled.wait(WAIT)
        ok = self.connack is not None and not self.connack.is_failure and self.client.is_connected()
        if not ok:
            self.close()
        return ok

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish QoS 1 and return the PUBACK reason code value."""
        info = self.client.publish(topic, payload, qos=1)
        assert self._event(info.mid).wait(WAIT), "no PUBACK"
        return int(self.acks[info.mid].value)

    def subscribe(self, topic_filter: str) -> int:
        result, mid = self.client.subscribe(topic_filter, qos=1)
        assert result == mqtt.MQTT_ERR_SUCCESS
        assert self._event(mid).wait(WAIT), "no SUBACK"
        return int(self.acks[mid][0].value)

    def received(self, count: int) -> list[mqtt.MQTTMessage]:
        out = []
        for _ in range(count):
            out.append(self.messages.get(timeout=WAIT))
        return out

    def nothing_more(self, marker_topic: str, sender: Client) -> bool:
        """Flush: publish a marker the subscriber may see; anything before it is a leak."""
        assert sender.publish(marker_topic, b"marker") < 128
        msg = self.messages.get(timeout=WAIT)
        return bool(msg.topic == marker_topic)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def connect(fleet: Fleet) -> Iterator[Any]:
    clients: list[Client] = []

    def _connect(name: str) -> Client:
        bundle = fleet.bundle(name)
        client = Client(fleet.broker.port, bundle / "ca.crt", bundle)
        assert client.connect(), f"{name} was refused"
        clients.append(client)
        return client

    yield _connect
    for c in clients:
        c.close()


def signed_status_update(bundle: Path, sender: str, round_: int = 1) -> bytes:
    key = signing.SigningKey.from_pem((bundle / "signing.key").read_bytes())
    env = codec.make_envelope(Kind.STATUS, FLEET, "wind", round_, sender, Status("online"), timestamp=1.0)
    return codec.encode(signing.sign(env, key))


# ----------------------------------------------------------------------------- who may connect


def test_client_without_certificate_is_refused(fleet: Fleet) -> None:
    assert not Client(fleet.broker.port, fleet.root / "ca.crt", None).connect()


def test_client_without_tls_is_refused(fleet: Fleet) -> None:
    assert not Client(fleet.broker.port, None, None).connect()


def test_certificate_from_another_ca_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    rogue = tmp_path / "rogue"
    provision.init_ca(rogue, fleet=FLEET)
    provision.provision_device(rogue, "gw1")  # same CN as a real gateway, wrong CA
    client = Client(fleet.broker.port, fleet.root / "ca.crt", rogue / "devices" / "gw1")
    assert not client.connect()


def test_provisioned_gateway_is_accepted(fleet: Fleet) -> None:
    client = Client(fleet.broker.port, fleet.root / "ca.crt", fleet.bundle("gw1"))
    assert client.connect()
    client.close()


# ----------------------------------------------------------------------------- what they may say


def test_gateway_cannot_publish_on_another_gateways_topic(connect: Any) -> None:
    aggregator, gw1 = connect("aggregator"), connect("gw1")
    assert aggregator.subscribe(TOPICS.updates_filter()) < 128
    assert gw1.publish(TOPICS.update("gw2"), b"forged") == NOT_AUTHORIZED
    assert gw1.publish(TOPICS.status("gw2"), b"forged") == NOT_AUTHORIZED
    assert gw1.publish(TOPICS.update("gw1"), b"own") < 128
    (msg,) = aggregator.received(1)
    assert (msg.topic, msg.payload) == (TOPICS.update("gw1"), b"own")  # the forged one never arrived


def test_only_the_aggregator_publishes_the_model(connect: Any) -> None:
    aggregator, gw1, gw2 = connect("aggregator"), connect("gw1"), connect("gw2")
    assert gw2.subscribe(TOPICS.model()) < 128
    assert gw1.publish(TOPICS.model(), b"evil model") == NOT_AUTHORIZED
    assert gw1.publish(TOPICS.round(), b"evil round") == NOT_AUTHORIZED
    assert gw1.publish(TOPICS.metrics(), b"evil metrics") == NOT_AUTHORIZED
    assert aggregator.publish(TOPICS.model(), b"model v1") < 128
    (msg,) = gw2.received(1)
    assert msg.payload == b"model v1"


def test_chunk_topics_follow_the_same_acl(connect: Any) -> None:
    aggregator, gw1, gw2 = connect("aggregator"), connect("gw1"), connect("gw2")
    chunk = TOPICS.model_chunk(b"\x07" * 32)
    assert aggregator.subscribe(TOPICS.update_chunks_filter()) < 128
    assert gw2.subscribe(TOPICS.model_chunks_filter()) < 128
    assert gw1.publish(chunk, b"evil chunk") == NOT_AUTHORIZED  # only the aggregator sends models
    assert gw1.publish(TOPICS.update_chunk("gw2"), b"forged chunk") == NOT_AUTHORIZED
    assert gw1.publish(TOPICS.update_chunk("gw1"), b"own chunk") < 128
    assert aggregator.publish(chunk, b"model chunk") < 128
    (up,) = aggregator.received(1)
    assert (up.topic, up.payload) == (TOPICS.update_chunk("gw1"), b"own chunk")
    (down,) = gw2.received(1)
    assert (down.topic, down.payload) == (chunk, b"model chunk")


def test_gateway_cannot_read_other_gateways_updates(connect: Any) -> None:
    gw1, gw2 = connect("gw1"), connect("gw2")
    # Mosquitto 2.0 grants the subscription itself and applies the read ACL per message.
    gw2.subscribe(TOPICS.updates_filter())
    assert gw2.subscribe(TOPICS.round()) < 128
    assert gw1.publish(TOPICS.update("gw1"), b"private delta") < 128
    aggregator = connect("aggregator")
    assert gw2.nothing_more(TOPICS.round(), aggregator)


def test_replayed_signed_update_is_rejected_after_crossing_the_broker(fleet: Fleet, connect: Any) -> None:
    aggregator, gw1 = connect("aggregator"), connect("gw1")
    keyring = provision.load_fleet_keyring(fleet.bundle("aggregator"))
    guard = signing.ReplayGuard(window_rounds=1)
    guard.advance(1)
    assert aggregator.subscribe(TOPICS.updates_filter()) < 128
    payload = signed_status_update(fleet.bundle("gw1"), "gw1")
    impostor = signed_status_update(fleet.bundle("gw1"), "gw2")  # gw1's key, gw2's name
    for p in (payload, payload, impostor):  # an attacker re-sends captured bytes
        assert gw1.publish(TOPICS.update("gw1"), p) < 128
    outcomes = []
    for msg in aggregator.received(3):
        env = codec.decode(msg.payload)
        try:
            signing.authenticate(env, keyring, guard, topic_device=parse_topic(msg.topic).device)
            outcomes.append("accepted")
        except RemoteProtocolError as exc:
            outcomes.append(exc.reason)
    assert outcomes == ["accepted", "replayed", "sender_mismatch"]


# ----------------------------------------------------------------------------- revocation


def test_revoked_gateway_is_refused_after_rerender_and_restart(tmp_path: Path) -> None:
    root = tmp_path / "fleet"
    port = free_port()
    broker = Broker(make_fleet(root, port), port, tmp_path / "mosquitto.log")
    stolen = tmp_path / "stolen-gw3"
    shutil.copytree(root / "devices" / "gw3", stolen)  # what a thief took off the gateway
    broker.start()
    try:
        before = Client(port, root / "ca.crt", stolen)
        assert before.connect()
        before.close()

        provision.revoke(root, "gw3")
        provision.provision_broker(root, port=port, run_as_user="root" if os.geteuid() == 0 else None)
        broker.stop()
        broker.start()

        assert not Client(port, root / "ca.crt", stolen).connect()
        still_fine = Client(port, root / "ca.crt", root / "devices" / "gw1")
        assert still_fine.connect()
        still_fine.close()
    finally:
        broker.stop()
    # The stolen signing key is dead too, even over a path that skips the broker.
    keyring = provision.load_fleet_keyring(root / "aggregator")
    env = codec.decode(signed_status_update(stolen, "gw3"))
    with pytest.raises(RemoteProtocolError) as info:
        signing.verify(env, keyring)
    assert info.value.reason == "unknown_key"  # gw3 is gone from the keyring ...
    assert keyring.is_revoked(signing.SigningKey.from_pem((stolen / "signing.key").read_bytes()).verify_key)
