"""Provisioning a fleet's credentials: CA, client/server certificates, signing keys, revocation.

Theory of operation
-------------------
One folder per fleet (``--dir``) holds everything; its layout is
:class:`broker_config.render.FleetLayout` and is documented in docs/security.md. The CA's
private key and an index of every identity it issued (``ca/index.json``) stay in that
folder on the security officer's machine. Each identity gets a *bundle* folder - what is
copied onto a gateway, the aggregator host or the broker host.

Two independent kinds of credential, on purpose:

- X.509 (EC P-256, via ``cryptography``): mutual TLS with the broker. The certificate CN is
  the MQTT username the generated ACL refers to; revocation goes into an X.509 CRL the
  broker loads (``crlfile``).
- Ed25519 signing keys (pycryptodome, :mod:`fedcore.protocol.signing`): end-to-end
  signatures on every envelope, checked by the aggregator and the gateways against
  ``keyring.json``; revocation goes into ``revoked.json``. These hold even if the broker
  (which terminates TLS) is compromised.

Identities have roles: ``device`` (a gateway: mTLS + signing key), ``aggregator`` (the
same), ``operator`` (mTLS only, read-only in the ACL: status, dashboards, plant systems;
operators sign nothing) and ``broker`` (the server certificate).

Every change rewrites the derived public files (keyring, revocation list, CRL, and the
broker's ACL once the broker is provisioned) and copies them into every bundle, so a
bundle is always self-contained. Private keys are written 0600, folders 0700, each file
atomically (write + rename).

Names are folder names as well as certificate CNs and topic levels: every bundle path
built from a name is resolved and must be a direct child of its folder before anything
is written or deleted (``check_name`` already refuses ``/``, ``.``, ``..`` and names
starting with ``.``; the containment check also catches a symlinked bundle folder).

The broker folder and its run user: Mosquitto started as root switches to the conf's
``user`` (recorded in the index as ``run_as``) before reading anything but the conf, so
every command that writes into ``broker/`` hands it to that user afterwards
(:mod:`broker_config.access`: run as root, the user exists -> owner of ``broker/``, fleet
root 0711; ``ca/`` and the other bundles stay 0700 root). :func:`broker_access_notes` says
in one line each why Mosquitto could still not read it.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_config import access
from broker_config.render import DEFAULT_RUN_USER, FleetLayout, render_mosquitto_conf, write_acl
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.protocol import signing
from fedcore.protocol.topics import check_name

INDEX_FORMAT = "fedgate-ca-index/1"
CA_DAYS = 3650
LEAF_DAYS = 825
# The broker refuses *every* client once the CRL's nextUpdate has passed (OpenSSL CRL
# check), so the CRL is re-signed on every provisioning command; see docs/security.md.
CRL_DAYS = 365
RESERVED_NAMES = frozenset({"broker", "ca"})
_CMDLINE = "<command line>"
_NAME_RULE = "must be 1-64 of [A-Za-z0-9_.-], not starting with '.'"
# What Mosquitto's `user` line and useradd accept; anything else could not be one word there.
_USER = re.compile(r"^[a-z_][a-z0-9_-]{0,31}\Z")
_HOST = re.compile(r"^[A-Za-z0-9_.:\-]{1,253}\Z")


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


# ----------------------------------------------------------------------------- files


def _mkdir(path: Path) -> None:
    # Each missing level is created 0700 (``parents=True`` would use the umask for them).
    missing = [p for p in (path, *path.parents) if not p.exists()]
    for level in reversed(missing):
        level.mkdir(mode=0o700)
        os.chmod(level, 0o700)


def _write(path: Path, data: bytes, mode: int) -> None:
    _mkdir(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is ignored when the file already exists
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _write_private(path: Path, data: bytes) -> None:
    _write(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    _write(path, data, 0o644)


def _json_bytes(doc: Any) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode("utf-8")


# ----------------------------------------------------------------------------- x509


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_ca(layout: FleetLayout) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    if not layout.ca_key.is_file():
        raise ConfigError(str(layout.root), "--dir", str(layout.root), "no fleet CA here: run `fedgate provision ca` first")
    key = serialization.load_pem_private_key(layout.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    cert = x509.load_pem_x509_certificate(layout.ca_cert.read_bytes())
    return key, cert


def _issue(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    common_name: str,
    server: bool,
    now: dt.datetime,
    days: int,
    hosts: Sequence[str] = (),
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if hosts:
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return key, builder.sign(ca_key, hashes.SHA256())


def _crl_pem(layout: FleetLayout, index: dict[str, Any], now: dt.datetime) -> bytes:
    ca_key, ca_cert = _load_ca(layout)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(int(index.get("crl_number", 0))), critical=False)
    )
    for entry in index["revoked"]:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(int(entry["cert_serial"]))
            .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"]))
            .build()
        )
    return builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# ----------------------------------------------------------------------------- index


def _load_index(layout: FleetLayout) -> dict[str, Any]:
    _load_ca(layout)  # a clear error when the CA is missing
    data: dict[str, Any] = json.loads(layout.index.read_text("utf-8"))
    if data.get("format") != INDEX_FORMAT:
        raise ConfigError(str(layout.index), "format", data.get("format"), f"expected {INDEX_FORMAT}")
    return data


def _check_identity_name(name: str, what: str) -> str:
    try:
        return check_name(name, what)
    except LocalProtocolError as exc:
        reserved = "branch of the topic tree" in str(exc)
        raise ConfigError(_CMDLINE, what, name, str(exc).split(" ", 2)[2] if reserved else _NAME_RULE) from exc


def _bundle_dir(layout: FleetLayout, name: str, role: str) -> Path:
    """The identity's bundle folder, once it is proven to be where it belongs.

    A device or operator bundle must resolve to a direct child of devices/ or operators/;
    the others are fixed folders of the fleet root. Anything else (``..``, a symlink out)
    is refused before a file is written or a folder deleted.
    """
    bundle = layout.identity_dir(name, role)
    parent = bundle.parent if role in ("device", "operator") else layout.root
    if bundle.resolve().parent != parent.resolve():
        raise ConfigError(_CMDLINE, role, name, f"would resolve to {bundle.resolve()}, outside {parent}")
    return bundle


def _operators(index: dict[str, Any]) -> list[str]:
    return sorted(n for n, e in index["identities"].items() if e["role"] == "operator")


def _publish(layout: FleetLayout, index: dict[str, Any], now: dt.datetime) -> None:
    """Rewrite keyring, revocation list and CRL, and copy them into every bundle; rewrite
    the broker's ACL once it is provisioned (operators come and go) and hand broker/ over."""
    index["crl_number"] = int(index.get("crl_number", 0)) + 1
    _write_private(layout.index, _json_bytes(index))
    devices = {
        name: signing.VerifyKey.from_hex(entry["public_key"])
        for name, entry in index["identities"].items()
        if entry["role"] == "device"
    }
    agg_name = index["aggregator"]
    agg_entry = index["identities"].get(agg_name)
    agg_key = signing.VerifyKey.from_hex(agg_entry["public_key"]) if agg_entry else None
    keyring = _json_bytes(signing.keyring_document(devices, agg_name, agg_key))
    revocations = _json_bytes(signing.revocations_document(index["revoked"]))
    crl = _crl_pem(layout, index, now)
    ca = layout.ca_cert.read_bytes()
    _write_public(layout.keyring, keyring)
    _write_public(layout.revocations, revocations)
    _write_public(layout.crl, crl)
    for name, entry in index["identities"].items():
        if entry["role"] == "broker":
            _write_public(layout.broker_ca, ca)
            _write_public(layout.broker_crl, crl)
            if layout.broker_conf.is_file():
                write_acl(layout, index["fleet"], agg_name, _operators(index), index.get("tasks", ()))
            access.hand_over(layout, entry.get("run_as"))
            continue
        bundle = _bundle_dir(layout, name, entry["role"])
        _write_public(bundle / "ca.crt", ca)
        _write_public(bundle / "keyring.json", keyring)
        _write_public(bundle / "revoked.json", revocations)


# ----------------------------------------------------------------------------- commands


def init_ca(dir: str | Path, fleet: str = "+", aggregator: str = "aggregator",
            now: dt.datetime | None = None, days: int = CA_DAYS, tasks: Iterable[str] = ()) -> Path:
    """Create the fleet CA in ``dir``; refuses to overwrite an existing one. Returns ca.crt.
    ``tasks``: the only task names anyone may write under (none: any task)."""
    layout = FleetLayout(Path(dir))
    if fleet != "+":
        _check_identity_name(fleet, "fleet")
    task_names = sorted({_check_identity_name(task, "task") for task in tasks})
    _check_identity_name(aggregator, "aggregator")
    if layout.ca_key.exists():
        raise ConfigError(str(layout.ca_key), "--dir", str(layout.root), "a fleet CA already exists here")
    now = _now(now)
    _mkdir(layout.root)
    _mkdir(layout.ca_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedgate"),
        x509.NameAttribute(NameOID.COMMON_NAME, f"fedgate fleet CA ({fleet if fleet != '+' else 'any fleet'})"),
    ])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(layout.ca_key, _key_pem(key))
    _write_public(layout.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    index: dict[str, Any] = {
        "format": INDEX_FORMAT, "fleet": fleet, "aggregator": aggregator,
        "identities": {}, "revoked": [], "crl_number": 0,
    }
    if task_names:
        index["tasks"] = task_names
    _publish(layout, index, now)
    return layout.ca_cert


def _provision_identity(
    layout: FleetLayout, index: dict[str, Any], name: str, role: str, now: dt.datetime, days: int
) -> Path:
    existing = index["identities"].get(name)
    if existing is not None:
        raise ConfigError(_CMDLINE, "NAME", name, f"already provisioned as {existing['role']}; revoke it first")
    bundle = _bundle_dir(layout, name, role)
    ca_key, ca_cert = _load_ca(layout)
    key, cert = _issue(ca_key, ca_cert, name, server=False, now=now, days=days)
    _mkdir(bundle)
    _write_private(bundle / "client.key", _key_pem(key))
    _write_public(bundle / "client.crt", cert.public_bytes(serialization.Encoding.PEM))
    public_key = None
    if role != "operator":  # operators sign nothing, so they hold no signing key
        signer = signing.SigningKey.from_seed(os.urandom(32))
        _write_private(bundle / "signing.key", signer.to_pem().encode("ascii"))
        _write_public(bundle / "signing.pub", (signer.verify_key.hex() + "\n").encode("ascii"))
        public_key = signer.verify_key.hex()
    index["identities"][name] = {
        "role": role, "serial": str(cert.serial_number), "public_key": public_key,
        "not_after": cert.not_valid_after_utc.isoformat(), "issued_at": now.isoformat(),
    }
    _publish(layout, index, now)
    return bundle


def _check_free_name(index: dict[str, Any], name: str, role: str) -> None:
    if name == index["aggregator"] or name in RESERVED_NAMES:
        # A device with the aggregator's CN would inherit the aggregator's ACL.
        raise ConfigError(_CMDLINE, role, name, "is reserved for the aggregator/broker/CA")


def provision_device(dir: str | Path, name: str, now: dt.datetime | None = None, days: int = LEAF_DAYS) -> Path:
    """Issue a gateway's client certificate (CN = ``name``) and signing key; return its bundle."""
    layout = FleetLayout(Path(dir))
    _check_identity_name(name, "device")
    index = _load_index(layout)
    _check_free_name(index, name, "device")
    return _provision_identity(layout, index, name, "device", _now(now), days)


def provision_operator(dir: str | Path, name: str, now: dt.datetime | None = None, days: int = LEAF_DAYS) -> Path:
    """Issue a read-only operator identity (client certificate, CN = ``name``; no signing
    key); return its bundle. Once the broker is provisioned, its ACL is rewritten too:
    Mosquitto must re-read it (``kill -HUP``)."""
    layout = FleetLayout(Path(dir))
    _check_identity_name(name, "operator")
    index = _load_index(layout)
    _check_free_name(index, name, "operator")
    return _provision_identity(layout, index, name, "operator", _now(now), days)


def provision_aggregator(dir: str | Path, now: dt.datetime | None = None, days: int = LEAF_DAYS) -> Path:
    """Issue the aggregator identity (its CN is the name fixed at ``init_ca``)."""
    layout = FleetLayout(Path(dir))
    index = _load_index(layout)
    return _provision_identity(layout, index, index["aggregator"], "aggregator", _now(now), days)


def provision_broker(
    dir: str | Path,
    port: int = 8883,
    host: str = "127.0.0.1",
    san: Sequence[str] = ("127.0.0.1", "localhost"),
    run_as_user: str | None = None,
    now: dt.datetime | None = None,
    days: int = LEAF_DAYS,
) -> Path:
    """Issue the broker's server certificate (once), re-sign the CRL, render conf + ACL.

    ``run_as_user`` (default ``mosquitto``) is the conf's ``user``: run as root, this hands
    ``broker/`` to that account when it exists (see :func:`broker_access_notes`).
    """
    if not 1 <= port <= 65535:  # before anything is written
        raise ConfigError(_CMDLINE, "--port", port, "must be a TCP port, 1-65535")
    layout = FleetLayout(Path(dir))
    run_as = run_as_user or DEFAULT_RUN_USER
    if not _USER.match(run_as):
        raise ConfigError(_CMDLINE, "--user", run_as, "is not a user name")
    if not _HOST.match(host):
        raise ConfigError(_CMDLINE, "--host", host, "is not a host name or address")
    index = _load_index(layout)
    now = _now(now)
    if not layout.broker_cert.is_file() or "broker" not in index["identities"]:
        ca_key, ca_cert = _load_ca(layout)
        hosts = list(dict.fromkeys([*san, host]))
        key, cert = _issue(ca_key, ca_cert, "broker", server=True, now=now, days=days, hosts=hosts)
        _mkdir(layout.broker_dir)
        _write_private(layout.broker_key, _key_pem(key))
        _write_public(layout.broker_cert, cert.public_bytes(serialization.Encoding.PEM))
        index["identities"]["broker"] = {
            "role": "broker", "serial": str(cert.serial_number), "public_key": None,
            "not_after": cert.not_valid_after_utc.isoformat(), "issued_at": now.isoformat(),
        }
    entry = index["identities"]["broker"]
    entry["run_as"] = run_as
    _publish(layout, index, now)
    conf = render_mosquitto_conf(
        layout.root, port, host=host, fleet=index["fleet"], aggregator=index["aggregator"],
        operators=_operators(index), tasks=index.get("tasks", ()), run_as_user=run_as,
    )
    access.hand_over(layout, run_as)
    return conf


def declared_tasks(dir: str | Path) -> list[str]:
    """The fleet's declared tasks (empty: any task may be written under)."""
    return list(_load_index(FleetLayout(Path(dir))).get("tasks", []))


def declare_task(dir: str | Path, task: str, now: dt.datetime | None = None) -> bool:
    """Add ``task`` to the fleet's declared tasks; True when that changed them (the broker's
    ACL then needs a reload). A fleet that allowed any task allows only ``task`` after it."""
    layout = FleetLayout(Path(dir))
    _load_ca(layout)
    index = _load_index(layout)
    _check_identity_name(task, "task")
    if task in index.get("tasks", []):
        return False
    index["tasks"] = sorted([*index.get("tasks", []), task])
    _publish(layout, index, _now(now))
    return True


def revoke(dir: str | Path, name: str, now: dt.datetime | None = None) -> str:
    """Revoke an identity's certificate (CRL) and signing key (revoked.json); remove its
    bundle; rewrite the broker's ACL (an operator's block goes). Returns the role.

    A reload (``kill -HUP``) makes Mosquitto 2.0 re-read the ACL and the CRL for new
    connections; only a restart drops a connection the revoked identity already holds.
    """
    layout = FleetLayout(Path(dir))
    _check_identity_name(name, "NAME")
    index = _load_index(layout)
    entry = index["identities"].get(name)
    if entry is None:
        raise ConfigError(_CMDLINE, "NAME", name, "no such active identity")
    bundle = _bundle_dir(layout, name, entry["role"]) if entry["role"] != "broker" else None
    now = _now(now)
    index["revoked"].append({
        "id": name, "role": entry["role"], "public_key": entry["public_key"],
        "cert_serial": entry["serial"], "revoked_at": now.isoformat(),
    })
    del index["identities"][name]
    if bundle is not None and bundle.is_dir():
        # The private keys are dead; keeping them around only invites reuse.
        shutil.rmtree(bundle)
    _publish(layout, index, now)
    return str(entry["role"])


def broker_access_notes(dir: str | Path) -> list[str]:
    """One line per reason why Mosquitto could not read broker/ as provisioned (none: fine)."""
    layout = FleetLayout(Path(dir))
    entry = _load_index(layout)["identities"].get("broker")
    return access.access_notes(layout, entry.get("run_as")) if entry else []


def load_fleet_keyring(dir: str | Path) -> signing.Keyring:
    """The keyring (with revocations) of a fleet folder or of an identity bundle."""
    root = Path(dir)
    return signing.load_keyring(root / "keyring.json", root / "revoked.json")
