"""Provisioning: real certificates checked by `cryptography` and the `openssl` CLI."""

from __future__ import annotations

import json
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
    provision.provision_broker(root, port=18883)
    return root


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
    private = [fleet / "ca" / "ca.key", fleet / "broker" / "server.key"]
    for bundle in (fleet / "devices" / "gw1", fleet / "aggregator"):
        private += [bundle / "client.key", bundle / "signing.key"]
    for path in private:
        assert mode(path) == 0o600, path
    for folder in [p for p in fleet.rglob("*") if p.is_dir()] + [fleet]:
        assert mode(folder) == 0o700, folder


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


def test_names_are_checked(fleet: Path) -> None:
    for bad in ("aggregator", "broker", "a/b", "+", "#", "", "x" * 65):
        with pytest.raises(ConfigError):
            provision.provision_device(fleet, bad)
    with pytest.raises(ConfigError, match="already provisioned"):
        provision.provision_device(fleet, "gw1")
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


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "f"
    assert main(["provision", "ca", "--dir", str(root)]) == 0
    assert main(["provision", "aggregator", "--dir", str(root)]) == 0
    assert main(["provision", "device", "gw7", "--dir", str(root)]) == 0
    assert main(["provision", "device", "bad/name", "--dir", str(root)]) == 78
    assert main(["provision", "broker", "--dir", str(root), "--port", "18999"]) == 0
    conf = (root / "broker" / "mosquitto.conf").read_text()
    assert "listener 18999 127.0.0.1" in conf
    assert main(["provision", "revoke", "gw7", "--dir", str(root)]) == 0
    assert main(["provision", "revoke", "gw7", "--dir", str(root)]) == 78
    assert "gw7" not in provision.load_fleet_keyring(root).devices
    assert main(["provision", "device", "gw8", "--dir", str(tmp_path / "nothing")]) == 78
