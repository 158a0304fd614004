"""Connection failures classified: transient or permanent, ours or the broker's, in words."""

from __future__ import annotations

import errno
import socket
import ssl
from pathlib import Path

import pytest

from fedcore.errors import LocalProtocolError
from fedcore.transport import failures
from fedcore.transport.base import BrokerUrl, ConnectFailed, TlsSettings

URL = BrokerUrl.parse("mqtts://broker.plant:8883")
TLS = TlsSettings(Path("/etc/fedgate/ca.crt"), Path("/etc/fedgate/client.crt"), Path("/etc/fedgate/client.key"))


def ssl_error(cls: type[ssl.SSLError], reason: str, verify_message: str = "") -> ssl.SSLError:
    exc = cls(1, f"[SSL: {reason}] {reason.lower()}")
    exc.reason = reason  # set by the C layer in real life
    if verify_message:
        exc.verify_message = verify_message  # type: ignore[attr-defined]
    return exc


def classify(exc: BaseException) -> ConnectFailed:
    return failures.socket_failure(URL, exc, TLS, connect_timeout=5.0)


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"), "connection refused by broker.plant:8883"),
        (TimeoutError("timed out"), "no answer from broker.plant:8883 within 5 s"),
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "cannot resolve the host 'broker.plant'"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "unreachable (No route to host)"),
        (ConnectionResetError(errno.ECONNRESET, "reset"), "was reset"),
        (ssl.SSLEOFError(8, "EOF occurred in violation of protocol"), "closed during the TLS handshake"),
        (ssl_error(ssl.SSLError, "DECRYPTION_FAILED_OR_BAD_RECORD_MAC"), "TLS error"),
    ],
)
def test_network_trouble_is_transient(exc: BaseException, words: str) -> None:
    failure = classify(exc)
    assert not failure.permanent and not failure.not_authorized
    assert words in failure.reason
    assert failure.url == str(URL)


def test_broker_certificate_not_trusted_points_at_ca_file() -> None:
    exc = ssl_error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED",
                    "self-signed certificate in certificate chain")
    failure = classify(exc)
    assert failure.permanent and not failure.not_authorized
    assert "broker.ca_file /etc/fedgate/ca.crt" in failure.reason
    assert "self-signed certificate in certificate chain" in failure.reason
    assert "check ca_file" in failure.reason


def test_host_name_mismatch_points_at_the_url() -> None:
    exc = ssl_error(ssl.SSLCertVerificationError, "CERTIFICATE_VERIFY_FAILED",
                    "Hostname mismatch, certificate is not valid for 'broker.plant'.")
    failure = classify(exc)
    assert failure.permanent and "broker.url" in failure.reason and "'broker.plant'" in failure.reason


@pytest.mark.parametrize(
    ("alert", "words"),
    [
        ("TLSV1_ALERT_UNKNOWN_CA", "not issued by a CA the broker trusts"),
        ("SSLV3_ALERT_CERTIFICATE_REVOKED", "revoked"),
        ("SSLV3_ALERT_CERTIFICATE_EXPIRED", "expired"),
        ("SSLV3_ALERT_BAD_CERTIFICATE", "could not verify it"),
    ],
)
def test_broker_refusing_our_certificate_is_not_authorized(alert: str, words: str) -> None:
    failure = classify(ssl_error(ssl.SSLError, alert))
    assert failure.permanent and failure.not_authorized
    assert "refused our client certificate" in failure.reason and words in failure.reason
    assert "/etc/fedgate/client.crt" in failure.reason and alert in failure.reason


def test_no_client_certificate_is_our_configuration() -> None:
    failure = failures.socket_failure(URL, ssl_error(ssl.SSLError, "TLSV13_ALERT_CERTIFICATE_REQUIRED"),
                                      TlsSettings(Path("ca.crt")), 5.0)
    assert failure.permanent and not failure.not_authorized
    assert "set broker.cert_file and broker.key_file" in failure.reason


def test_tls_to_a_plain_port_is_permanent() -> None:
    failure = classify(ssl_error(ssl.SSLError, "WRONG_VERSION_NUMBER"))
    assert failure.permanent and "does not speak TLS" in failure.reason


@pytest.mark.parametrize(
    ("code", "permanent", "not_authorized", "words"),
    [
        (135, True, True, "not authorized"),
        (134, True, True, "bad user name or password"),
        (138, True, True, "banned"),
        (133, True, False, "client identifier not valid"),
        (136, False, False, "server unavailable"),
        (137, False, False, "server busy"),
        (159, False, False, "connection rate exceeded"),
        (250, False, False, "Some future code"),
    ],
)
def test_connack_refusals(code: int, permanent: bool, not_authorized: bool, words: str) -> None:
    failure = failures.connack_failure(URL, code, "Some future code")
    assert (failure.permanent, failure.not_authorized) == (permanent, not_authorized)
    assert f"CONNACK {code}" in failure.reason and words in failure.reason


def test_a_closed_connection_hints_at_the_scheme_only_for_plain_urls() -> None:
    assert "mqtts://" in failures.closed_before_connack(BrokerUrl.parse("mqtt://h:8883")).reason
    assert "mqtts://" not in failures.closed_before_connack(URL).reason
    assert not failures.no_connack(URL, 5.0).permanent


def test_not_authorized_implies_permanent() -> None:
    with pytest.raises(LocalProtocolError):
        ConnectFailed("u", "r", permanent=False, not_authorized=True)
