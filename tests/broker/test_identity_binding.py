"""The generated broker config binds identities and bounds what a device can write.

A real Mosquitto runs the conf and ACL `fedgate provision broker` writes for a fleet that
declares its task (``provision ca --task wind``):

- the client id is the certificate name whatever the client asks for, so a gateway
  connecting as ``aggregator`` cannot take the aggregator's session over: it can only
  replace its own;
- a device can write, and so retain, under the declared task and the protocol's secagg
  stages only: nothing grows the broker's retained store under names of its own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Disconnected
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

pytestmark = pytest.mark.broker

FLEET, TASK = "plant", "wind"


@pytest.fixture
def fleet(workdir: Path) -> Iterator[tuple[Path, int, list[PahoTransport]]]:  # noqa: F811
    root = workdir / "fleet"
    provision.init_ca(root, fleet=FLEET, tasks=[TASK])
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    port = free_port()
    conf = provision.provision_broker(root, port=port)
    broker = MosquittoProcess(["mosquitto", "-c", str(conf)], workdir, port, workdir / "mosquitto.log")
    clients: list[PahoTransport] = []
    try:
        broker.start()
        yield root, port, clients
    finally:
        for client in clients:
            client.stop()
        broker.stop()


def test_no_certificate_can_take_another_identitys_session(
    fleet: tuple[Path, int, list[PahoTransport]],
) -> None:
    root, port, clients = fleet
    aggregator, aggregator_log = connect(port, root / "aggregator", "aggregator")
    clients.append(aggregator)
    gw1, gw1_log = connect(port, root / "devices" / "gw1", "gw1")
    clients.append(gw1)
    # gw2's certificate asking for the aggregator's client id gets its own name instead
    intruder, _ = connect(port, root / "devices" / "gw2", "aggregator")
    clients.append(intruder)
    # ...and a second gw1 session, whatever id it asks for, replaces the first gw1 one
    second, _ = connect(port, root / "devices" / "gw1", "gw1-second")
    clients.append(second)
    gw1_log.wait_for(Disconnected, timeout=WAIT)
    time.sleep(0.5)  # a late kick of the aggregator would show by now
    assert not any(isinstance(e, Disconnected) for e in aggregator_log.events)
    assert aggregator.connected and intruder.connected


def test_a_device_writes_under_the_declared_task_and_stages_only(
    fleet: tuple[Path, int, list[PahoTransport]],
) -> None:
    root, port, clients = fleet
    gw1, _ = connect(port, root / "devices" / "gw1", "gw1")
    clients.append(gw1)
    declared = Topics(FLEET, TASK)
    for topic in (declared.update("gw1"), declared.secagg("keys", "gw1"), declared.status("gw1")):
        assert not gw1.publish(topic, b"", qos=1, wait=WAIT).denied, topic
    retained = b"x" * 1024
    for topic in (Topics(FLEET, "junk1").update("gw1"), Topics(FLEET, "junk2").secagg("keys", "gw1"),
                  f"fg/{FLEET}/{TASK}/secagg/junk/gw1"):
        result = gw1.publish(topic, retained, qos=1, retain=True, wait=WAIT)
        assert result.reason_code == NOT_AUTHORIZED, topic
    # a task declared later is writable once the broker re-read its ACL
    assert provision.declare_task(root, "pumps")
    assert not provision.declare_task(root, "pumps")
    assert "fg/plant/pumps/update/%u" in (root / "broker" / "acl").read_text()


def test_a_fleet_of_any_task_can_be_restricted_later(workdir: Path) -> None:  # noqa: F811
    with pytest.raises(ConfigError, match="branch of the topic tree"):
        provision.init_ca(workdir / "reserved", fleet=FLEET, tasks=["status"])
    provision.init_ca(workdir / "portless", fleet=FLEET)
    with pytest.raises(ConfigError, match="1-65535"):
        provision.provision_broker(workdir / "portless", port=0)
    assert not (workdir / "portless" / "broker").exists()  # refused before anything is written
    root = workdir / "open"
    provision.init_ca(root, fleet=FLEET)
    assert provision.declared_tasks(root) == []  # any task
    assert provision.declare_task(root, "wind")  # from now on, this one only
    assert provision.declared_tasks(root) == ["wind"]
