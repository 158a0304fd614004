"""Provisioning: real certificates checked by `cryptography` and the `openssl` CLI."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from broker_config.render import FleetLayout
from fedcore.errors import ConfigError
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import Kind, Status
from fedgate import provision
from fedgate.cli import main


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fleet") / "creds"
    provision.init_ca(root, fleet="plant")
    provision.provision_aggregator(root)
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    provision.provision_operator(root, "ops")
    provision.provision_broker(root, port=18883)
    return root


def mosquitto_user() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("mosquitto")
    except KeyError:
        return None


def handed_over() -> bool:
    """Whether provisioning here hands broker/ to the `mosquitto` account (root, user exists)."""
    return os.geteuid() == 0 and mosquitto_user() is not None


def cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def openssl_verify(root: Path, leaf: Path, crl: bool) -> bool:
    args = ["openssl", "verify", "-CAfile", str(root / "ca.crt")]
    if crl:
        args += ["-crl_check", "-CRLfile", str(root / "crl.pem")]
    return subprocess.run([*args, str(leaf)], capture_output=True).returncode == 0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_private_files_are_private(fleet: Path) -> None:
    private = [fleet / "ca" / "ca.key", fleet / "ca" / "index.json", fleet / "broker" / "server.key"]
    for bundle in (fleet / "devices" / "gw1", fleet / "aggregator"):
        private += [bundle / "client.key", bundle / "signing.key"]
    private += [fleet / "operators" / "ops" / "client.key", fleet / "broker" / "acl"]
    for path in private:
        assert mode(path) == 0o600, path
    for folder in [p for p in fleet.rglob("*") if p.is_dir()]:
        assert mode(folder) == 0o700, folder
    # The root is passable (not listable) only when broker/ belongs to Mosquitto's account.
    assert mode(fleet) == (0o711 if handed_over() else 0o700)


def test_broker_folder_belongs_to_the_broker_and_the_ca_does_not(fleet: Path) -> None:
    me = os.geteuid()
    broker_owner = mosquitto_user().pw_uid if handed_over() else me  # type: ignore[union-attr]
    for path in [fleet / "broker", *(fleet / "broker").rglob("*")]:
        assert path.stat().st_uid == broker_owner, path
    for path in [fleet, *(p for p in fleet.rglob("*") if not p.is_relative_to(fleet / "broker"))]:
        assert path.stat().st_uid == me, path
    (note,) = provision.broker_access_notes(fleet)
    if handed_over():
        # pytest's base temp folder is private to root: the note names it.
        closed = next(p for p in reversed(fleet.parents) if not mode(p) & 0o001)
        assert f"mosquitto cannot enter {closed} " in note
    else:
        assert "start Mosquitto as" in note


def test_a_missing_run_user_is_explained_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "f"
    provision.init_ca(root)
    provision.provision_broker(root, port=18883, run_as_user="no-such-account")
    assert (root / "broker" / "mosquitto.conf").read_text().count("\nuser no-such-account\n") == 1
    assert mode(root) == 0o700 and (root / "broker").stat().st_uid == os.geteuid()
    (note,) = provision.broker_access_notes(root)
    assert "no-such-account" in note and "\n" not in note
    if os.geteuid() == 0:
        assert "does not exist" in note and "--user" in note
    with pytest.raises(ConfigError, match="--user"):
        provision.provision_broker(root, port=18883, run_as_user="root\nlistener 1883")
    with pytest.raises(ConfigError, match="--host"):
        provision.provision_broker(root, port=18883, host="0.0.0.0\nallow_anonymous true")


def test_certificates_chain_to_the_fleet_ca(fleet: Path) -> None:
    ca = cert(fleet / "ca.crt")
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    gw1 = cert(fleet / "devices" / "gw1" / "client.crt")
    assert gw1.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "gw1"
    gw1.verify_directly_issued_by(ca)
    eku = gw1.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.CLIENT_AUTH in eku
    agg = cert(fleet / "aggregator" / "client.crt")
    assert agg.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "aggregator"
    server = cert(fleet / "broker" / "server.crt")
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert "127.0.0.1" in [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    for leaf in (fleet / "devices" / "gw1" / "client.crt", fleet / "broker" / "server.crt"):
        assert openssl_verify(fleet, leaf, crl=True)


def test_bundle_is_self_contained_and_signs(fleet: Path) -> None:
    bundle = fleet / "devices" / "gw1"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "ca.crt", "client.crt", "client.key", "keyring.json", "revoked.json", "signing.key", "signing.pub",
    ]
    key = signing.SigningKey.from_pem((bundle / "signing.key").read_bytes())
    assert (bundle / "signing.pub").read_text().strip() == key.verify_key.hex()
    env = codec.make_envelope(Kind.STATUS, "plant", "t", 0, "gw1", Status("online"), timestamp=0.0)
    # The aggregator verifies with the keyring from its own bundle.
    signing.verify(signing.sign(env, key), provision.load_fleet_keyring(fleet / "aggregator"))
    ring = provision.load_fleet_keyring(bundle)
    agg_key = signing.SigningKey.from_pem((fleet / "aggregator" / "signing.key").read_bytes())
    assert ring.aggregator_key == agg_key.verify_key


BAD_NAMES = ("aggregator", "broker", "ca", "a/b", "+", "#", "", "x" * 65, ".", "..", ".hidden", "gw1\n")


def test_names_are_checked(fleet: Path) -> None:
    for bad in BAD_NAMES:
        with pytest.raises(ConfigError):
            provision.provision_device(fleet, bad)
        with pytest.raises(ConfigError):
            provision.provision_operator(fleet, bad)
    for bad in BAD_NAMES[3:]:
        with pytest.raises(ConfigError):
            provision.revoke(fleet, bad)
    with pytest.raises(ConfigError, match="already provisioned as device"):
        provision.provision_device(fleet, "gw1")
    with pytest.raises(ConfigError, match="already provisioned as device"):
        provision.provision_operator(fleet, "gw1")
    with pytest.raises(ConfigError, match="already provisioned as operator"):
        provision.provision_device(fleet, "ops")
    with pytest.raises(ConfigError, match="already exists"):
        provision.init_ca(fleet)


def test_revocation_reaches_crl_keyring_and_openssl(fleet: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(fleet, root)
    layout = FleetLayout(root)
    old_cert = root / "devices" / "gw2" / "client.crt"
    kept_cert = tmp_path / "gw2-old.crt"
    shutil.copy(old_cert, kept_cert)
    old_key = signing.VerifyKey.from_hex((root / "devices" / "gw2" / "signing.pub").read_text().strip())
    assert openssl_verify(root, kept_cert, crl=True)

    provision.revoke(root, "gw2")

    assert not (root / "devices" / "gw2").exists()
    crl = x509.load_pem_x509_crl(layout.crl.read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(cert(kept_cert).serial_number) is not None
    assert layout.broker_crl.read_bytes() == layout.crl.read_bytes()
    assert not openssl_verify(root, kept_cert, crl=True)
    assert openssl_verify(root, root / "devices" / "gw1" / "client.crt", crl=True)
    ring = provision.load_fleet_keyring(root / "aggregator")
    assert ring.is_revoked(old_key) and "gw2" not in ring.devices
    revoked = json.loads(layout.revocations.read_text())["revoked"]
    assert [e["id"] for e in revoked] == ["gw2"]

    # Re-provisioning the same name gives a fresh, trusted key; the old one stays revoked.
    provision.provision_device(root, "gw2")
    ring = provision.load_fleet_keyring(root)
    assert ring.devices["gw2"] != old_key and not ring.is_revoked(ring.devices["gw2"])
    assert ring.is_revoked(old_key)


def test_operator_bundle_is_read_only_material(fleet: Path) -> None:
    bundle = fleet / "operators" / "ops"
    assert sorted(p.name for p in bundle.iterdir()) == [
        "ca.crt", "client.crt", "client.key", "keyring.json", "revoked.json",
    ]
    ops = cert(bundle / "client.crt")
    assert ops.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "ops"
    assert ExtendedKeyUsageOID.CLIENT_AUTH in ops.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert openssl_verify(fleet, bundle / "client.crt", crl=True)
    entry = json.loads((fleet / "ca" / "index.json").read_text())["identities"]["ops"]
    assert entry["role"] == "operator" and entry["public_key"] is None
    assert entry["serial"] == str(ops.serial_number)
    assert "ops" not in provision.load_fleet_keyring(bundle).devices  # it signs nothing
    acl = (fleet / "broker" / "acl").read_text().splitlines()
    assert "user ops" in acl and "topic read fg/plant/+/deployed" in acl


def test_operator_provisioning_and_revocation_rewrite_the_acl(fleet: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(fleet, root, symlinks=True)
    acl = root / "broker" / "acl"
    provision.provision_operator(root, "dashboard")
    assert "user dashboard" in acl.read_text().splitlines()
    owner = acl.stat().st_uid
    serial = cert(root / "operators" / "dashboard" / "client.crt").serial_number

    assert provision.revoke(root, "dashboard") == "operator"

    assert "user dashboard" not in acl.read_text().splitlines()
    assert "user ops" in acl.read_text().splitlines()
    assert acl.stat().st_uid == owner  # still readable by the broker's account after a rewrite
    assert not (root / "operators" / "dashboard").exists()
    crl = x509.load_pem_x509_crl((root / "broker" / "crl.pem").read_bytes())
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None


def test_paths_built_from_names_stay_in_their_folder(fleet: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(fleet, root, symlinks=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (root / "devices" / "gw9").symlink_to(outside)
    with pytest.raises(ConfigError, match="outside"):
        provision.provision_device(root, "gw9")
    assert list(outside.iterdir()) == []
    # A bundle swapped for a link out of the fleet is refused before anything is deleted.
    shutil.rmtree(root / "devices" / "gw2")
    (root / "devices" / "gw2").symlink_to(outside)
    (outside / "keep").write_text("x")
    with pytest.raises(ConfigError, match="outside"):
        provision.revoke(root, "gw2")
    assert (outside / "keep").exists()
    assert "gw2" in json.loads((root / "ca" / "index.json").read_text())["identities"]


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>" for p in root.rglob("*")}


@pytest.mark.parametrize("bad", ["..", ".", ".hidden", "a/b"])
@pytest.mark.parametrize("command", ["device", "operator", "revoke"])
def test_cli_refuses_names_that_are_not_one_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, bad: str
) -> None:
    root = tmp_path / "f"
    assert main(["provision", "ca", "--dir", str(root)]) == 0
    assert main(["provision", "device", "gw1", "--dir", str(root)]) == 0
    before = tree(root)
    capsys.readouterr()
    assert main(["provision", command, bad, "--dir", str(root)]) == 78
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and repr(bad) in err, err
    assert tree(root) == before  # nothing written, nothing deleted


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "f"
    assert main(["provision", "ca", "--dir", str(root)]) == 0
    assert main(["provision", "aggregator", "--dir", str(root)]) == 0
    assert main(["provision", "device", "gw7", "--dir", str(root)]) == 0
    assert main(["provision", "device", "bad/name", "--dir", str(root)]) == 78
    assert main(["provision", "broker", "--dir", str(root), "--port", "18999"]) == 0
    conf = (root / "broker" / "mosquitto.conf").read_text()
    assert "listener 18999 127.0.0.1" in conf
    assert main(["provision", "operator", "ops", "--dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "operator bundle" in out and "kill -HUP" in out
    assert main(["provision", "revoke", "gw7", "--dir", str(root)]) == 0
    assert main(["provision", "revoke", "gw7", "--dir", str(root)]) == 78
    assert "gw7" not in provision.load_fleet_keyring(root).devices
    assert main(["provision", "device", "gw8", "--dir", str(tmp_path / "nothing")]) == 78
