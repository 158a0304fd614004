"""TLS files are checked before connecting: a bad file is a ConfigError naming key and file."""

from __future__ import annotations

import random
import shutil
import socket
import ssl
from pathlib import Path

import pytest

from fedcore.errors import ConfigError
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import TlsSettings
from fedcore.transport.factory import transport_from_config
from fedcore.transport.paho import PahoTransport
from fedcore.transport.paho_client import set_tcp_nodelay
from fedcore.transport.tls import tls_context
from fedgate import provision


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tls") / "fleet"
    provision.init_ca(root, fleet="plant")
    for name in ("gw1", "gw2"):
        provision.provision_device(root, name)
    return root


def bundle(fleet: Path, tmp_path: Path, name: str = "gw1") -> Path:
    copy = tmp_path / name
    shutil.copytree(fleet / "devices" / name, copy)
    return copy


def settings(b: Path) -> TlsSettings:
    return TlsSettings(b / "ca.crt", b / "client.crt", b / "client.key")


def test_a_good_bundle_gives_a_verifying_context(fleet: Path, tmp_path: Path) -> None:
    context = tls_context(settings(bundle(fleet, tmp_path)), "edge.toml")
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_missing_file_names_config_file_key_and_path(fleet: Path, tmp_path: Path, key: str) -> None:
    b = bundle(fleet, tmp_path)
    tls = settings(b)
    missing = getattr(tls, key)
    missing.unlink()
    with pytest.raises(ConfigError) as info:
        tls_context(tls, "/etc/fedgate/edge.toml")
    error = info.value
    assert (error.file, error.key, error.value) == ("/etc/fedgate/edge.toml", f"broker.{key}", str(missing))
    assert "No such file or directory" in error.problem
    assert error.exit_code == 78


def test_unreadable_file_is_a_config_error(fleet: Path, tmp_path: Path) -> None:
    b = bundle(fleet, tmp_path)
    (b / "client.key").unlink()
    (b / "client.key").mkdir()  # unreadable even for root, unlike mode 000
    with pytest.raises(ConfigError, match=r"broker.key_file.*cannot read the file: Is a directory"):
        tls_context(settings(b), "edge.toml")


def test_garbage_files_are_blamed_on_the_right_key(fleet: Path, tmp_path: Path) -> None:
    b = bundle(fleet, tmp_path)
    (b / "ca.crt").write_text("not a certificate\n")
    with pytest.raises(ConfigError) as info:
        tls_context(settings(b), "edge.toml")
    assert info.value.key == "broker.ca_file" and "not a PEM CA certificate" in info.value.problem

    b = bundle(fleet, tmp_path / "2")
    (b / "client.crt").write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    with pytest.raises(ConfigError) as info:
        tls_context(settings(b), "edge.toml")
    assert info.value.key == "broker.cert_file"


def test_key_of_another_identity_is_refused(fleet: Path, tmp_path: Path) -> None:
    b = bundle(fleet, tmp_path)
    shutil.copy(fleet / "devices" / "gw2" / "client.key", b / "client.key")
    with pytest.raises(ConfigError) as info:
        tls_context(settings(b), "edge.toml")
    assert info.value.key == "broker.key_file"
    assert "does not belong to the certificate" in info.value.problem


def test_encrypted_key_is_refused_without_prompting(fleet: Path, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    b = bundle(fleet, tmp_path)
    key = serialization.load_pem_private_key((b / "client.key").read_bytes(), None)
    (b / "client.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(ConfigError, match="the key is encrypted"):
        tls_context(settings(b), "edge.toml")


def test_the_factory_names_the_config_file_before_connecting(fleet: Path, tmp_path: Path) -> None:
    b = bundle(fleet, tmp_path)
    (b / "client.crt").unlink()
    config = BrokerConfig("mqtts://127.0.0.1:1", "gw1", b / "ca.crt", b / "client.crt",
                          b / "client.key", file="/etc/fedgate/edge.toml")
    with pytest.raises(ConfigError) as info:
        transport_from_config(config)
    assert str(info.value).startswith("/etc/fedgate/edge.toml: key 'broker.cert_file' = ")
    assert str(b / "client.crt") in str(info.value)


def test_a_malformed_url_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"broker.url"):
        transport_from_config(BrokerConfig("mqtt://host:notaport", "gw1", file="edge.toml"))


def test_direct_use_without_a_config_file_still_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"broker.ca_file"):
        PahoTransport("mqtts://127.0.0.1:1", "x", tls=TlsSettings(tmp_path / "none.crt"),
                      rng=random.Random(0))


def test_set_tcp_nodelay_tolerates_non_tcp_sockets() -> None:
    a, b = socket.socketpair()
    with a, b:
        set_tcp_nodelay(a)  # AF_UNIX: no TCP options, no error
