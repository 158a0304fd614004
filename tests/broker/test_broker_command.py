"""The README's broker commands, run as written, on a real Mosquitto with real certificates.

``fedgate provision ...`` runs as a subprocess in a fresh folder with the relative path
``fleet`` (a free loopback port instead of 8883); then ``mosquitto -c
fleet/broker/mosquitto.conf`` starts once as root (Mosquitto switches to its own account
before reading the ACL, certificates, CRL and persistence file) and once directly as the
``mosquitto`` account, and a provisioned gateway connects over mTLS.

The work folder is made under the system temp folder with mode 0711: pytest's own temp
folders are private to the user running the tests, so Mosquitto's account could not pass
through them (``fedgate provision broker`` says so in a note).
"""

from __future__ import annotations

import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from fedcore.protocol.topics import Topics
from fedcore.transport.base import Connected, TlsSettings
from fedcore.transport.paho import PahoTransport
from tests.conftest import EventLog

pytestmark = pytest.mark.broker

WAIT = 10.0  # seconds to wait for something that should happen; never asserted on
NOT_AUTHORIZED = 135


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fedgate_command() -> str:
    """The installed `fedgate` console script (next to this interpreter, or on PATH)."""
    beside = Path(sys.executable).with_name("fedgate")
    found = str(beside) if beside.is_file() else shutil.which("fedgate")
    if found is None:
        pytest.fail("the `fedgate` command is not installed (pip install -e '.[test]')")
    return found


def fedgate(cwd: Path, *args: str) -> str:
    """Run `fedgate ARGS` in ``cwd`` as a user would; return its output."""
    done = subprocess.run([fedgate_command(), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"fedgate {' '.join(args)}: {done.stderr}"
    return done.stdout


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A fresh folder that Mosquitto's account may pass through (0711)."""
    path = Path(tempfile.mkdtemp(prefix="fedgate-broker-"))
    os.chmod(path, 0o711)
    yield path
    shutil.rmtree(path)


class MosquittoProcess:
    """``mosquitto -c CONF`` (optionally behind a prefix such as ``runuser``) as a child."""

    def __init__(self, command: Sequence[str], cwd: Path, port: int, log: Path) -> None:
        self.command, self.cwd, self.port, self.log = list(command), cwd, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if shutil.which("mosquitto") is None:
            pytest.fail("mosquitto is not on PATH (apt-get install mosquitto)")
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.command, cwd=self.cwd, stdout=log, stderr=log)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {self.log.read_text()[-2000:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"mosquitto did not start listening: {self.log.read_text()[-2000:]}")

    def reload(self) -> None:
        """``kill -HUP``: Mosquitto re-reads its conf, ACL, certificates and CRL."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGHUP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=WAIT)
        self.proc = None


def connect(port: int, bundle: Path, client_id: str) -> tuple[PahoTransport, EventLog]:
    """A PahoTransport with a bundle's mTLS material, started; waits for CONNACK."""
    tls = TlsSettings(bundle / "ca.crt", bundle / "client.crt", bundle / "client.key")
    transport = PahoTransport(
        f"mqtts://127.0.0.1:{port}", client_id, clean_start=True, tls=tls, rng=random.Random(0),
        backoff_min=WAIT, backoff_max=WAIT,  # one attempt within a test's waits
    )
    log = EventLog()
    transport.start(log)
    log.wait_for(Connected, timeout=WAIT)
    return transport, log


def as_mosquitto(*command: str) -> list[str]:
    return ["runuser", "-u", "mosquitto", "--", *command]


STARTS: dict[str, Callable[[list[str]], list[str]]] = {
    "as-root": lambda command: command,
    "as-mosquitto-user": lambda command: as_mosquitto(*command),
}


@pytest.mark.parametrize("start", sorted(STARTS))
def test_readme_broker_commands_work_on_a_fresh_machine(workdir: Path, start: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("starting Mosquitto as root and as another account needs root")
    try:
        broker_account = pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.fail("the mosquitto account is missing (apt-get install mosquitto creates it)")
    port = free_port()
    fedgate(workdir, "provision", "ca", "--dir", "fleet", "--fleet", "plant1")
    fedgate(workdir, "provision", "aggregator", "--dir", "fleet")
    fedgate(workdir, "provision", "device", "gw-press-1", "--dir", "fleet")
    out = fedgate(workdir, "provision", "broker", "--dir", "fleet", "--port", str(port))
    assert "note:" not in out, out  # nothing left for the user to fix
    fleet = workdir / "fleet"

    # The CA key stays root's alone; Mosquitto's account can pass the root but not list it.
    assert (fleet / "ca").stat().st_mode & 0o777 == 0o700
    assert (fleet / "ca" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert (fleet / "ca" / "ca.key").stat().st_uid == 0
    for peek in (["cat", "fleet/ca/ca.key"], ["ls", "fleet"], ["cat", "fleet/devices/gw-press-1/client.key"]):
        assert subprocess.run(as_mosquitto(*peek), cwd=workdir, capture_output=True).returncode != 0, peek
    assert "set_tcp_nodelay true" in (fleet / "broker" / "mosquitto.conf").read_text().splitlines()

    command = STARTS[start](["mosquitto", "-c", "fleet/broker/mosquitto.conf"])
    broker = MosquittoProcess(command, workdir, port, workdir / "mosquitto.log")
    clients: list[PahoTransport] = []
    try:
        broker.start()
        gateway, _ = connect(port, fleet / "devices" / "gw-press-1", "gw-press-1")
        clients.append(gateway)
        topics = Topics("plant1", "wind")
        accepted = gateway.publish(topics.status("gw-press-1"), b"online", retain=True, wait=WAIT)
        assert accepted.reason_code is not None and not accepted.denied
        denied = gateway.publish(topics.update("gw-press-2"), b"forged", wait=WAIT)
        assert denied.reason_code == NOT_AUTHORIZED  # the generated ACL is in force
        aggregator, seen = connect(port, fleet / "aggregator", "aggregator")
        clients.append(aggregator)
        aggregator.subscribe(topics.status_filter())
        (message,) = seen.messages(1, timeout=WAIT)
        assert (message.topic, message.payload) == (topics.status("gw-press-1"), b"online")
    finally:
        for client in clients:
            client.stop()
        broker.stop()
    # Mosquitto wrote its persistence file as its own account, in both cases.
    database = fleet / "broker" / "data" / "mosquitto.db"
    assert database.stat().st_uid == broker_account.pw_uid, (workdir / "mosquitto.log").read_text()
