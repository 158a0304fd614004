"""The paho transport says why it cannot connect, against a real Mosquitto.

TLS brokers here are the conftest's private Mosquitto with a TLS listener made of
certificates from ``fedgate.provision`` (a fleet CA, a broker certificate, device bundles,
a CRL and the generated ACL), as in tests/broker/test_security.py.
"""

from __future__ import annotations

import logging
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, ConnectFailed, PublishDenied, TlsSettings
from fedcore.transport.connection import ConnectionWatch
from fedcore.transport.paho import PahoTransport
from fedgate import provision
from fedgate.broker import RunningBroker, free_port
from tests.conftest import EventLog

pytestmark = pytest.mark.broker

FLEET = "plant"
TOPICS = Topics(FLEET, "wind")


@dataclass(frozen=True)
class TlsFleet:
    """A provisioned fleet: CA, broker certificate, device bundles (gw2 revoked; its
    stolen bundle kept in ``stolen``) and a rogue fleet whose gw1 has the same name."""

    root: Path
    rogue: Path
    stolen: Path

    def bundle(self, name: str) -> Path:
        return self.root / ("aggregator" if name == "aggregator" else f"devices/{name}")

    def tls(self, bundle: Path, ca: Path | None = None) -> TlsSettings:
        return TlsSettings(ca or bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")

    def listener(self, server: Path | None = None) -> str:
        """Mosquitto lines making the factory's listener an mTLS one with the fleet's ACL."""
        server = server or self.root / "broker"
        return "\n".join([
            f"cafile {self.root / 'ca.crt'}",
            f"certfile {server / 'server.crt'}",
            f"keyfile {server / 'server.key'}",
            "require_certificate true",
            "use_identity_as_username true",
            "use_username_as_clientid true",  # as the generated mosquitto.conf
            f"crlfile {self.root / 'crl.pem'}",
            f"acl_file {self.root / 'broker' / 'acl'}",
        ])


def make_tls_fleet(base: Path) -> TlsFleet:
    root, rogue = base / "fleet", base / "rogue"
    provision.init_ca(root, fleet=FLEET)
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    stolen = base / "stolen-gw2"
    shutil.copytree(root / "devices" / "gw2", stolen)
    provision.revoke(root, "gw2")
    provision.provision_broker(root, port=8883, run_as_user="root")  # certificate, CRL, ACL
    provision.init_ca(rogue, fleet=FLEET)
    provision.provision_device(rogue, "gw1")
    provision.provision_broker(rogue, port=8883, run_as_user="root")
    return TlsFleet(root, rogue, stolen)


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> TlsFleet:
    return make_tls_fleet(tmp_path_factory.mktemp("connect-failures"))


@pytest.fixture
def tls_broker(tls_fleet: TlsFleet, mosquitto_factory: Callable[..., RunningBroker]) -> RunningBroker:
    return mosquitto_factory(extra_config=tls_fleet.listener())


@pytest.fixture
def transport() -> Iterator[Callable[..., PahoTransport]]:
    made: list[PahoTransport] = []

    def make(url: str, client_id: str = "gw1", **kwargs: object) -> PahoTransport:
        kwargs.setdefault("rng", random.Random(len(made)))
        kwargs.setdefault("backoff_min", 0.05)
        kwargs.setdefault("backoff_max", 0.2)
        t = PahoTransport(url, client_id, **kwargs)  # type: ignore[arg-type]
        made.append(t)
        return t

    yield make
    for t in made:
        t.stop()


def tls_url(broker: RunningBroker) -> str:
    return f"mqtts://127.0.0.1:{broker.port}"


def first_failure(t: PahoTransport, log: EventLog, timeout: float = 10.0) -> ConnectFailed:
    t.start(log)
    return log.wait_for(ConnectFailed, timeout=timeout)


# ----------------------------------------------------------------------------- transient


def test_refused_port_is_transient_and_every_attempt_is_reported_with_its_delay(
    transport: Callable[..., PahoTransport], events: Callable[[], EventLog],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="fedcore.transport.paho")
    port = free_port()
    log = events()
    t = transport(f"mqtt://127.0.0.1:{port}")
    first = first_failure(t, log)
    assert not first.permanent and not first.not_authorized
    assert first.url == f"mqtt://127.0.0.1:{port}"
    assert f"connection refused by 127.0.0.1:{port}" in first.reason
    assert first.retry_in_s is not None and 0.025 <= first.retry_in_s <= 0.05  # attempt 0 of the backoff
    log.wait_for(ConnectFailed, lambda e: e is not first)  # it keeps trying
    assert not any(isinstance(e, Connected) for e in log.events)
    lines = [r.getMessage() for r in caplog.records if "next attempt in" in r.getMessage()]
    assert lines and "connection refused" in lines[0]


def test_unreachable_host_is_reported_within_the_connect_timeout(
    transport: Callable[..., PahoTransport], events: Callable[[], EventLog],
) -> None:
    log = events()
    t = transport("mqtt://192.0.2.1:1883", connect_timeout=1.0)  # TEST-NET-1: never answers
    started = time.monotonic()
    failure = first_failure(t, log, timeout=5.0)
    assert time.monotonic() - started < 3.0
    assert not failure.permanent
    assert "192.0.2.1:1883" in failure.reason  # timed out, or unreachable without a route


def test_a_server_that_never_answers_connect_is_reported_after_the_connect_timeout(
    transport: Callable[..., PahoTransport], events: Callable[[], EventLog],
) -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # the kernel completes TCP handshakes; nobody ever answers
        log = events()
        t = transport(f"mqtt://127.0.0.1:{silent.getsockname()[1]}", connect_timeout=1.0)
        started = time.monotonic()
        failure = first_failure(t, log, timeout=5.0)
    assert time.monotonic() - started < 3.5
    assert not failure.permanent and "no CONNACK within 1 s" in failure.reason


def test_plain_url_on_a_tls_listener_hints_at_the_scheme(
    tls_broker: RunningBroker, transport: Callable[..., PahoTransport], events: Callable[[], EventLog],
) -> None:
    failure = first_failure(transport(tls_broker.url), events())
    assert not failure.permanent and "mqtts://" in failure.reason


# ----------------------------------------------------------------------------- permanent


def test_tls_listener_with_a_different_ca_is_a_config_problem(
    tls_fleet: TlsFleet, mosquitto_factory: Callable[..., RunningBroker],
    transport: Callable[..., PahoTransport], events: Callable[[], EventLog],
) -> None:
    other = mosquitto_factory(extra_config=tls_fleet.listener(server=tls_fleet.rogue / "broker"))
    bundle = tls_fleet.bundle("gw1")
    failure = first_failure(transport(tls_url(other), tls=tls_fleet.tls(bundle)), events())
    assert failure.permanent and not failure.not_authorized
    assert f"broker.ca_file {bundle / 'ca.crt'}" in failure.reason and "check ca_file" in failure.reason
    verdict = ConnectionWatch(failure.url, 60, started_at=0).handle(failure, now=1)
    assert verdict is not None and verdict.exit_code == 78


@pytest.mark.parametrize(("who", "words"), [
    ("rogue", "not issued by a CA the broker trusts"),
    ("revoked", "revoked"),
])
def test_client_certificate_the_broker_refuses_is_not_authorized(
    tls_fleet: TlsFleet, tls_broker: RunningBroker, transport: Callable[..., PahoTransport],
    events: Callable[[], EventLog], who: str, words: str,
) -> None:
    bundle = tls_fleet.rogue / "devices" / "gw1" if who == "rogue" else tls_fleet.stolen
    tls = tls_fleet.tls(bundle, ca=tls_fleet.root / "ca.crt")  # trusts the right broker
    failure = first_failure(transport(tls_url(tls_broker), tls=tls), events())
    assert failure.permanent and failure.not_authorized
    assert "refused our client certificate" in failure.reason and words in failure.reason
    assert str(bundle / "client.crt") in failure.reason
    verdict = ConnectionWatch(failure.url, 60, started_at=0).handle(failure, now=1)
    assert verdict is not None and verdict.exit_code == 77


def test_connack_not_authorized_is_permanent(
    mosquitto_factory: Callable[..., RunningBroker], transport: Callable[..., PahoTransport],
    events: Callable[[], EventLog],
) -> None:
    broker = mosquitto_factory(extra_config="allow_anonymous false")
    log = events()
    failure = first_failure(transport(broker.url), log)
    assert failure.permanent and failure.not_authorized
    assert "CONNACK 135 (not authorized)" in failure.reason
    second = log.wait_for(ConnectFailed, lambda e: e is not failure)  # one event per attempt
    assert second.reason == failure.reason


def test_provisioned_gateway_connects_and_its_wrong_id_is_denied_on_its_status_topic(
    tls_fleet: TlsFleet, tls_broker: RunningBroker, transport: Callable[..., PahoTransport],
    events: Callable[[], EventLog],
) -> None:
    """gw1's certificate, configured as "gw9": the broker accepts the connection and
    answers PUBACK 135 on gw9's status topic, which the watch turns into exit 77."""
    log = events()
    t = transport(tls_url(tls_broker), "gw9", tls=tls_fleet.tls(tls_fleet.bundle("gw1")))
    t.start(log)
    log.wait_for(Connected)
    assert t.publish(TOPICS.status("gw1"), b"", wait=5).reason_code in (0, 16)
    result = t.publish(TOPICS.status("gw9"), b"", wait=5)
    assert result.denied and result.reason_code == 135
    denied = log.wait_for(PublishDenied)
    assert denied == PublishDenied(TOPICS.status("gw9"), 135)
    watch = ConnectionWatch(t.url.__str__(), 60, started_at=0, identity="gw9",
                            own_topics=(TOPICS.status("gw9"), TOPICS.update("gw9")))
    verdicts = [watch.handle(e, now=1) for e in log.events]
    final = [v for v in verdicts if v is not None][-1]
    assert final.exit_code == 77 and "'gw9' differs from the name in the client certificate" in final.message
