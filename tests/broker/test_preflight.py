"""`fedgate config check FILE --live` against a real Mosquitto with provisioned certificates."""

from __future__ import annotations

import io
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, Disconnected, MessageReceived
from fedcore.transport.paho import PahoTransport
from fedgate.broker import RunningBroker, free_port
from fedgate.cli_config import check_file
from tests.broker.test_connect_failures import TlsFleet, make_tls_fleet
from tests.conftest import EventLog
from tests.fedgate.test_config_check import aggregator_toml, edge_toml

pytestmark = pytest.mark.broker

TOPICS = Topics("plant", "wind")
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory: pytest.TempPathFactory) -> TlsFleet:
    return make_tls_fleet(tmp_path_factory.mktemp("preflight"))


@pytest.fixture
def broker(tls_fleet: TlsFleet, mosquitto_factory: Callable[..., RunningBroker]) -> RunningBroker:
    return mosquitto_factory(extra_config=tls_fleet.listener())


def url(broker: RunningBroker) -> str:
    return f"mqtts://127.0.0.1:{broker.port}"


def live(config: Path, timeout_s: float = 5.0, session: bool = False) -> tuple[int, list[str]]:
    out = io.StringIO()
    code = check_file(str(config), out=out, live=True, session=session, timeout_s=timeout_s)
    return code, out.getvalue().splitlines()


def lines_of(lines: list[str], prefix: str) -> list[str]:
    return [line for line in lines if line.startswith(prefix)]


def test_live_alone_checks_the_certificate_without_a_session(
    tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path
) -> None:
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=url(broker))
    code, lines = live(config)
    assert code == 0, "\n".join(lines)
    [connected] = lines_of(lines, "ok       broker:")
    assert "certificate accepted as 'gw1' (CONNACK 140 to the probe)" in connected
    skipped = lines_of(lines, "skip     subscribe:") + lines_of(lines, "skip     publish:")
    assert len(skipped) == 2 and all("add --session" in line for line in skipped)
    assert "broker included" in lines[-1]


def test_a_good_edge_config_passes(tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=url(broker))
    code, lines = live(config, session=True)
    assert code == 0, "\n".join(lines)
    [connected] = lines_of(lines, "ok       broker:")
    assert "TLS handshake and CONNACK" in connected
    assert [line.split(":")[1].strip() for line in lines_of(lines, "ok       subscribe:")] == [
        TOPICS.round(), TOPICS.model(), TOPICS.deployment()]
    [published] = lines_of(lines, "ok       publish:")
    assert TOPICS.status("gw1") in published and "empty, not retained" in published
    assert "broker included" in lines[-1]


def test_a_good_aggregator_config_passes(tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path) -> None:
    code, lines = live(aggregator_toml(tmp_path / "aggregator.toml", tls_fleet.bundle("aggregator"),
                                       url=url(broker)), session=True)
    assert code == 0, "\n".join(lines)
    assert len(lines_of(lines, "ok       subscribe:")) == 2
    assert TOPICS.metrics() in lines_of(lines, "ok       publish:")[0]


def test_wrong_device_id_fails_offline_and_live_with_77(
    tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path
) -> None:
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), device="gw9", url=url(broker))
    code, lines = live(config, session=True)
    assert code == 77
    offline = lines_of(lines, "PROBLEM  certificate name:")
    assert offline and "key 'device.id' = 'gw9'" in offline[0] and "issued to 'gw1'" in offline[0]
    ok_connect = lines_of(lines, "ok       broker:")
    assert ok_connect, "the broker accepts gw1's certificate whatever the configured id"
    [denied] = lines_of(lines, "PROBLEM  publish:")
    assert f"refused our publish on {TOPICS.status('gw9')}: not authorized (135)" in denied
    assert "the configured id 'gw9' differs from the name in the client certificate" in denied
    assert denied.endswith("(exit 77)")


def test_wrong_ca_fails_with_78(tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path) -> None:
    rogue_ca = tls_fleet.rogue / "ca.crt"
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=url(broker), ca=rogue_ca)
    code, lines = live(config)
    assert code == 78
    [line] = lines_of(lines, "PROBLEM  broker:")
    assert f"cannot verify the broker's certificate with broker.ca_file {rogue_ca}" in line
    assert lines_of(lines, "skip     publish:")


def test_revoked_certificate_fails_with_77(tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.stolen, device="gw2", url=url(broker))
    code, lines = live(config)
    [line] = lines_of(lines, "PROBLEM  broker:")
    assert "refused our client certificate" in line and "revoked" in line
    assert code == 77


def test_missing_key_file_fails_with_78_naming_the_file(
    tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path
) -> None:
    missing = tmp_path / "client.key"
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=url(broker), key=missing)
    code, lines = live(config)
    assert code == 78
    [first, *_] = lines_of(lines, "PROBLEM")
    assert f"key 'broker.key_file' = '{missing}'" in first and "No such file or directory" in first
    assert lines_of(lines, "skip     broker:")  # no attempt with a half-configured TLS


def test_unreachable_broker_fails_with_69_within_the_timeout(tls_fleet: TlsFleet, tmp_path: Path) -> None:
    config = edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=f"mqtts://127.0.0.1:{free_port()}")
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "fedgate", "config", "check", str(config), "--live", "--timeout", "2"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    elapsed = time.monotonic() - started
    assert proc.returncode == 69, proc.stdout + proc.stderr
    [line] = lines_of(proc.stdout.splitlines(), "PROBLEM  broker:")
    assert "no connection to" in line and "within 2 s" in line and "connection refused" in line
    assert elapsed < 2 + 8  # the timeout plus the interpreter's start-up
    assert "would exit 69" in proc.stdout.splitlines()[-1]


def test_the_check_does_not_disturb_a_running_gateway(
    tls_fleet: TlsFleet, broker: RunningBroker, tmp_path: Path, events: Callable[[], EventLog]
) -> None:
    """Same certificate, and the broker names sessions after certificates: the probe opens
    none, so the gateway keeps its connection and its retained status."""
    gw_log, watcher_log = events(), events()
    tls = tls_fleet.tls(tls_fleet.bundle("gw1"))
    gateway = PahoTransport(url(broker), "gw1", tls=tls, rng=random.Random(1))
    watcher = PahoTransport(url(broker), "aggregator", tls=tls_fleet.tls(tls_fleet.bundle("aggregator")),
                            clean_start=True, rng=random.Random(2))
    try:
        gateway.start(gw_log)
        gw_log.wait_for(Connected)
        gateway.publish(TOPICS.status("gw1"), b"online", retain=True, wait=5)
        code, lines = live(edge_toml(tmp_path / "edge.toml", tls_fleet.bundle("gw1"), url=url(broker)))
        assert code == 0, "\n".join(lines)
        watcher.start(watcher_log)
        watcher_log.wait_for(Connected)
        watcher.subscribe(TOPICS.status_filter())
        [retained] = watcher_log.messages(1)
        assert retained == MessageReceived(TOPICS.status("gw1"), b"online", retained=True)
        assert not any(isinstance(e, Disconnected) for e in gw_log.events)
        assert gateway.connected
    finally:
        gateway.publish(TOPICS.status("gw1"), b"", retain=True, wait=5)
        gateway.stop()
        watcher.stop()
