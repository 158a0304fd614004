"""Render the broker's mosquitto.conf and ACL file from the fleet's credential folder.

Theory of operation: the credential folder written by ``fedgate provision`` has a fixed
layout (:class:`FleetLayout`, documented in docs/security.md). The broker config is a
plain ``string.Template`` (``templates/mosquitto.conf.tmpl``) filled with paths from that
layout and a few limits; the ACL comes from :func:`broker_config.acl.generate_acl`, i.e.
from the topic module, never written by hand. Rendering is deterministic (same inputs,
same bytes) so a diff of the rendered files shows exactly what an operator changed.

The conf's ``user`` is the account Mosquitto reads everything but the conf as; who owns
``broker/`` is :mod:`broker_config.access`'s business, this module only writes the files.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from string import Template

from broker_config.acl import generate_acl

TEMPLATE = Path(__file__).parent / "templates" / "mosquitto.conf.tmpl"

# MQTT caps a packet at 256 MB; fedgate chunks payloads above its own limit, so the broker
# refuses anything larger than one chunk plus headers.
DEFAULT_MAX_PACKET_SIZE = 8 * 1024 * 1024 + 64 * 1024
# Mosquitto's default of 1000 drops QoS 1 messages in bursts to a slow aggregator.
DEFAULT_MAX_QUEUED_MESSAGES = 100_000
# The account Mosquitto switches to when started as root (its own default too).
DEFAULT_RUN_USER = "mosquitto"


@dataclass(frozen=True, slots=True)
class FleetLayout:
    """Where each file of a fleet's credential folder lives (relative to ``root``)."""

    root: Path

    @property
    def ca_dir(self) -> Path:
        return self.root / "ca"

    @property
    def ca_key(self) -> Path:
        return self.ca_dir / "ca.key"

    @property
    def ca_cert(self) -> Path:
        return self.root / "ca.crt"

    @property
    def index(self) -> Path:
        return self.ca_dir / "index.json"

    @property
    def crl(self) -> Path:
        return self.root / "crl.pem"

    @property
    def keyring(self) -> Path:
        return self.root / "keyring.json"

    @property
    def revocations(self) -> Path:
        return self.root / "revoked.json"

    @property
    def devices_dir(self) -> Path:
        return self.root / "devices"

    @property
    def operators_dir(self) -> Path:
        return self.root / "operators"

    def identity_dir(self, name: str, role: str) -> Path:
        """Bundle folder of one identity: devices/NAME, operators/NAME, aggregator/, broker/."""
        if role == "device":
            return self.devices_dir / name
        if role == "operator":
            return self.operators_dir / name
        return self.root / role

    @property
    def broker_dir(self) -> Path:
        return self.root / "broker"

    @property
    def broker_cert(self) -> Path:
        return self.broker_dir / "server.crt"

    @property
    def broker_key(self) -> Path:
        return self.broker_dir / "server.key"

    @property
    def broker_ca(self) -> Path:
        return self.broker_dir / "ca.crt"

    @property
    def broker_crl(self) -> Path:
        return self.broker_dir / "crl.pem"

    @property
    def broker_conf(self) -> Path:
        return self.broker_dir / "mosquitto.conf"

    @property
    def broker_acl(self) -> Path:
        return self.broker_dir / "acl"

    @property
    def broker_data(self) -> Path:
        return self.broker_dir / "data"


def render_mosquitto_conf_text(
    layout: FleetLayout,
    port: int,
    host: str = "127.0.0.1",
    run_as_user: str | None = None,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    persistence: bool = True,
) -> str:
    """The mosquitto.conf text (pure: no files touched)."""
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    user = run_as_user or DEFAULT_RUN_USER
    for what, value in (("host", host), ("user", user)):
        if not value or any(c.isspace() or c == "#" for c in value):
            raise ValueError(f"{what} {value!r} would not be one word in mosquitto.conf")
    template = Template(TEMPLATE.read_text("utf-8"))
    return template.substitute(
        user=user,
        persistence="true" if persistence else "false",
        persistence_location=f"{layout.broker_data.resolve()}/",
        host=host,
        port=port,
        cafile=layout.broker_ca.resolve(),
        certfile=layout.broker_cert.resolve(),
        keyfile=layout.broker_key.resolve(),
        crlfile=layout.broker_crl.resolve(),
        acl_file=layout.broker_acl.resolve(),
        max_queued_messages=max_queued_messages,
        max_packet_size=max_packet_size,
        message_size_limit=max_packet_size,
    )


def render_mosquitto_conf(
    dir: str | Path,
    port: int,
    *,
    host: str = "127.0.0.1",
    fleet: str = "+",
    aggregator: str = "aggregator",
    operators: Iterable[str] = (),
    tasks: Iterable[str] = (),
    run_as_user: str | None = None,
    max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
    max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
    persistence: bool = True,
) -> Path:
    """Write ``broker/mosquitto.conf`` and ``broker/acl`` into the fleet folder; return the conf.

    The server certificate, CA and CRL must already exist (``fedgate provision broker``).
    """
    layout = FleetLayout(Path(dir))
    for needed in (layout.broker_ca, layout.broker_cert, layout.broker_key, layout.broker_crl):
        if not needed.is_file():
            raise FileNotFoundError(f"{needed} is missing: run `fedgate provision ca/broker` first")
    text = render_mosquitto_conf_text(
        layout, port, host, run_as_user, max_queued_messages, max_packet_size, persistence
    )
    layout.broker_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    layout.broker_data.mkdir(mode=0o700, exist_ok=True)
    write_acl(layout, fleet, aggregator, operators, tasks)
    _write(layout.broker_conf, text)
    return layout.broker_conf


def write_acl(layout: FleetLayout, fleet: str, aggregator: str, operators: Iterable[str] = (),
              tasks: Iterable[str] = ()) -> bool:
    """(Re)write ``broker/acl``; True when its content changed (Mosquitto must reload it)."""
    text = generate_acl(fleet, aggregator, operators, tasks)
    try:
        if layout.broker_acl.read_text("utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    _write(layout.broker_acl, text)
    return True


def _write(path: Path, text: str) -> None:
    # Written 0600: the ACL and conf reveal the fleet's structure; the broker's user reads them.
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)
