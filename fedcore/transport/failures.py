"""Why a connection attempt failed, in words an operator can act on.

Theory of operation
-------------------
paho reports a failed attempt as an exception from the socket or TLS layer, or as a
CONNACK reason code. This module turns either into a :class:`ConnectFailed` event: a
reason naming the cause and the file or setting to check, and two verdicts:

- ``permanent``: retrying cannot help until someone changes something. TLS verification
  of the broker (``ca_file``, host name), the broker refusing our certificate, and CONNACK
  refusals such as "not authorized" are permanent. A refused port, an unreachable host, a
  timeout, a failed DNS lookup or a connection closed mid-handshake are transient: the
  broker may be restarting, the network may come back.
- ``not_authorized``: the permanent cause is the broker refusing *us* (unknown CA,
  revoked or expired certificate, CONNACK 135/134/138): exit 77, not 78.

TLS 1.3 detail: the client finishes its handshake before the broker has checked the
client certificate, so the broker's refusal arrives as a TLS alert on the first read
after the handshake (``SSLError`` with a reason such as ``TLSV1_ALERT_UNKNOWN_CA``), not
from the handshake itself. The transport feeds those read errors here too.

Pure: no sockets, no clocks; exceptions and codes in, events out.
"""

from __future__ import annotations

import errno
import socket
import ssl

from fedcore.transport.base import BrokerUrl, ConnectFailed, TlsSettings

# Alerts the broker sends when it refuses our client certificate (OpenSSL reason names).
_REFUSED_CERTIFICATE = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not issued by a CA the broker trusts (another fleet's certificate?)",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it is revoked (on the broker's CRL)",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired, or the broker's CRL has (docs/security.md: re-sign the CRL yearly)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the broker could not verify it",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the broker could not verify it",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "it is not a client certificate",
    "TLSV1_ALERT_ACCESS_DENIED": "the broker denies access to it",
    "TLSV1_ALERT_DECRYPT_ERROR": "the broker could not verify our signature (key and certificate from different identities?)",
}
_NO_CLIENT_CERTIFICATE = {"TLSV13_ALERT_CERTIFICATE_REQUIRED", "PEER_DID_NOT_RETURN_A_CERTIFICATE"}
# Handshakes that fail the same way every time: no TLS version or cipher in common.
_NOTHING_IN_COMMON = {
    "SSLV3_ALERT_HANDSHAKE_FAILURE", "TLSV1_ALERT_PROTOCOL_VERSION", "UNSUPPORTED_PROTOCOL",
    "NO_SHARED_CIPHER", "NO_PROTOCOLS_AVAILABLE", "TLSV1_ALERT_INSUFFICIENT_SECURITY",
}

# CONNACK reason codes (MQTT v5) -> (what it means, permanent, not_authorized).
_CONNACK: dict[int, tuple[str, bool, bool]] = {
    128: ("unspecified error", False, False),
    129: ("malformed CONNECT (a bug in fedgate or the broker)", True, False),
    130: ("protocol error (a bug in fedgate or the broker)", True, False),
    131: ("implementation specific error", False, False),
    132: ("the broker does not speak MQTT v5 (Mosquitto >= 1.6 does)", True, False),
    133: ("client identifier not valid: check broker.client_id", True, False),
    134: ("bad user name or password", True, True),
    135: ("not authorized", True, True),
    136: ("server unavailable", False, False),
    137: ("server busy", False, False),
    138: ("banned", True, True),
    140: ("bad authentication method", True, True),
    144: ("the last will's topic is invalid", True, False),
    149: ("packet too large (the last will is larger than the broker allows)", True, False),
    151: ("quota exceeded", False, False),
    153: ("the last will's payload format is invalid", True, False),
    154: ("retain not supported (the last will is retained)", True, False),
    155: ("QoS not supported (the last will's QoS)", True, False),
    156: ("the broker says to use another server: update broker.url", True, False),
    157: ("the broker has moved: update broker.url", True, False),
    159: ("connection rate exceeded", False, False),
}


def connack_failure(url: BrokerUrl, code: int, name: str = "") -> ConnectFailed:
    """A CONNACK with a reason code >= 0x80."""
    meaning, permanent, not_authorized = _CONNACK.get(code, (name or "refused", False, False))
    return ConnectFailed(
        str(url), f"the broker refused the connection: CONNACK {code} ({meaning})",
        permanent, not_authorized,
    )


def socket_failure(
    url: BrokerUrl, exc: BaseException, tls: TlsSettings | None, connect_timeout: float
) -> ConnectFailed:
    """An exception while connecting, during the TLS handshake, or on a read or write
    before the CONNACK arrived."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _untrusted_broker(url, exc, tls)
    if isinstance(exc, ssl.SSLError) and not isinstance(
        exc, ssl.SSLEOFError | ssl.SSLZeroReturnError | ssl.SSLSyscallError
    ):
        return _tls_failure(url, exc, tls)
    return ConnectFailed(str(url), _network_reason(url, exc, connect_timeout), permanent=False)


def closed_before_connack(url: BrokerUrl) -> ConnectFailed:
    """The broker closed the connection without a CONNACK and without saying why."""
    return ConnectFailed(
        str(url), f"the broker closed the connection before answering CONNECT{_scheme_hint(url)}",
        permanent=False,
    )


def _scheme_hint(url: BrokerUrl) -> str:
    """What a TLS listener does to a plain CONNECT: close or reset the connection."""
    return "" if url.tls else " (if this port is a TLS listener, the url must start with mqtts://)"


def no_connack(url: BrokerUrl, timeout: float) -> ConnectFailed:
    return ConnectFailed(
        str(url), f"no CONNACK within {timeout:g} s (the broker accepted TCP but does not answer)",
        permanent=False,
    )


def _untrusted_broker(
    url: BrokerUrl, exc: ssl.SSLCertVerificationError, tls: TlsSettings | None
) -> ConnectFailed:
    detail = getattr(exc, "verify_message", None) or _alert(exc) or str(exc)
    if "mismatch" in str(detail).lower():
        reason = (
            f"the broker's certificate is not valid for the host {url.host!r} ({detail}): use "
            "a host name the broker certificate names in broker.url, or reissue it with --san"
        )
    else:
        ca = tls.ca_file if tls is not None and tls.ca_file is not None else "the system trust store"
        reason = (
            f"cannot verify the broker's certificate with broker.ca_file {ca} ({detail}): "
            "check ca_file; it must be the fleet CA (ca.crt of this device's bundle)"
        )
    return ConnectFailed(str(url), reason, permanent=True)


def _tls_failure(url: BrokerUrl, exc: ssl.SSLError, tls: TlsSettings | None) -> ConnectFailed:
    alert = _alert(exc)
    cert = tls.cert_file if tls is not None else None
    if alert in _REFUSED_CERTIFICATE:
        reason = (
            f"the broker refused our client certificate (broker.cert_file {cert}): "
            f"{_REFUSED_CERTIFICATE[alert]} [{alert}]"
        )
        return ConnectFailed(str(url), reason, permanent=True, not_authorized=True)
    if alert in _NO_CLIENT_CERTIFICATE:
        reason = (
            "the broker requires a client certificate and we sent none: "
            "set broker.cert_file and broker.key_file (client.crt, client.key of the bundle)"
        )
        return ConnectFailed(str(url), reason, permanent=True)
    if alert == "WRONG_VERSION_NUMBER":
        reason = (
            "the broker's port does not speak TLS: use mqtt:// for a plain listener, "
            "or the port of its TLS listener"
        )
        return ConnectFailed(str(url), reason, permanent=True)
    if alert in _NOTHING_IN_COMMON:
        reason = f"the broker and we have no TLS version or cipher in common [{alert}]"
        return ConnectFailed(str(url), reason, permanent=True)
    # Anything else may be the network's doing (a middlebox, a torn record): retry.
    return ConnectFailed(str(url), f"TLS error: {alert or exc}", permanent=False)


def _alert(exc: BaseException) -> str:
    """OpenSSL's reason name (``TLSV1_ALERT_UNKNOWN_CA``...), when the error carries one."""
    return str(getattr(exc, "reason", None) or "")


def _network_reason(url: BrokerUrl, exc: BaseException, connect_timeout: float) -> str:
    where = f"{url.host}:{url.port}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host {url.host!r}: {exc.strerror or exc}"
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused by {where} (is the broker running and listening on this port?)"
    if isinstance(exc, TimeoutError | socket.timeout):
        return (
            f"no answer from {where} within {connect_timeout:g} s "
            "(host down, or a firewall drops the packets)"
        )
    if isinstance(exc, ssl.SSLError):
        return f"the connection closed during the TLS handshake ({_alert(exc) or exc})"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return f"the connection to {where} was reset{_scheme_hint(url)}"
    if isinstance(exc, OSError) and exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
        return f"{where} is unreachable ({exc.strerror})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{where}: {exc.strerror}"
    return f"{where}: {exc}"
