"""The client's TLS context, built from the config's files before any connection is tried.

A missing, unreadable or malformed ``ca_file`` / ``cert_file`` / ``key_file``, a key that
does not belong to the certificate, or an encrypted key is a :class:`ConfigError` naming
the config file, the key (``broker.ca_file``...) and the path: the service exits 78 at
once with one line instead of a traceback, and systemd does not restart it forever.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

from fedcore.errors import ConfigError
from fedcore.transport.base import TlsSettings

NO_CONFIG_FILE = "(transport settings)"


class _EncryptedKeyError(Exception):
    """Raised from the password callback: fedgate services cannot prompt for a password."""


def _refuse_password() -> str:
    raise _EncryptedKeyError


def tls_files(tls: TlsSettings) -> list[tuple[str, Path]]:
    """The files ``tls`` names, as (setting name, path)."""
    named = (("ca_file", tls.ca_file), ("cert_file", tls.cert_file), ("key_file", tls.key_file))
    return [(name, path) for name, path in named if path is not None]


def read_error(path: Path) -> str | None:
    """Why ``path`` cannot be read by this process, or None when it can."""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return f"cannot read the file: {exc.strerror or exc}"
    return None


def tls_context(
    tls: TlsSettings, config_file: str = NO_CONFIG_FILE, section: str = "broker"
) -> ssl.SSLContext:
    """A client context that verifies the broker (certificate chain and host name) and
    presents our certificate. Raises ConfigError for any file problem."""

    def error(name: str, path: Path, problem: str) -> ConfigError:
        return ConfigError(config_file, f"{section}.{name}" if section else name, str(path), problem)

    for name, path in tls_files(tls):
        problem = read_error(path)
        if problem is not None:
            raise error(name, path, problem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    if tls.ca_file is not None:
        try:
            context.load_verify_locations(cafile=str(tls.ca_file))
        except ssl.SSLError as exc:
            raise error("ca_file", tls.ca_file, f"not a PEM CA certificate ({getattr(exc, 'reason', None) or exc})") from None
    else:
        context.load_default_certs()
    if tls.cert_file is not None and tls.key_file is not None:
        _load_client_identity(context, tls.cert_file, tls.key_file, error)
    return context


def _load_client_identity(
    context: ssl.SSLContext, cert: Path, key: Path, error: Callable[[str, Path, str], ConfigError]
) -> None:
    try:  # parse the certificate alone first, so a bad file is blamed on the right key
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(cert))
    except ssl.SSLError as exc:
        raise error("cert_file", cert, f"not a PEM certificate ({getattr(exc, 'reason', None) or exc})") from None
    try:
        context.load_cert_chain(str(cert), str(key), password=_refuse_password)
    except _EncryptedKeyError:
        raise error("key_file", key, "the key is encrypted; the service needs an unencrypted key "
                    "(mode 0600, owned by the service user)") from None
    except ssl.SSLError as exc:
        if getattr(exc, "reason", None) == "KEY_VALUES_MISMATCH":
            raise error("key_file", key, f"does not belong to the certificate in cert_file {cert} "
                        "(copy client.crt and client.key from the same bundle)") from None
        raise error("key_file", key, f"not a PEM private key ({getattr(exc, 'reason', None) or exc})") from None


def client_certificate_problem(ca_file: Path, cert_file: Path, key_file: Path) -> str | None:
    """Would a broker trusting ``ca_file`` accept ``cert_file`` as a client certificate?
    None if so, else OpenSSL's reason (unknown issuer, expired, not for client use...).

    The check is a TLS handshake in memory, the same verification Mosquitto runs, minus the
    CRL: a server context that trusts the CA and requires a client certificate (it presents
    our own certificate as its server certificate, which nobody verifies here) against a
    client context presenting ours. Files must be readable (see :func:`tls_context`)."""
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(str(cert_file), str(key_file), password=_refuse_password)
    server.verify_mode = ssl.CERT_REQUIRED
    server.load_verify_locations(cafile=str(ca_file))
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE  # only the server's verdict on us matters
    client.load_cert_chain(str(cert_file), str(key_file), password=_refuse_password)
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    ours = client.wrap_bio(to_client, to_server)
    theirs = server.wrap_bio(to_server, to_client, server_side=True)
    for _ in range(10):  # a TLS 1.3 handshake takes two round trips
        for side in (ours, theirs):
            try:
                side.do_handshake()
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLError as exc:
                if side is theirs:
                    return str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc)
                raise
    try:  # TLS 1.3: the server checks the client certificate when it reads our Finished
        theirs.read(1)
    except ssl.SSLWantReadError:
        return None
    except ssl.SSLError as exc:
        return str(getattr(exc, "verify_message", None) or getattr(exc, "reason", None) or exc)
    return None


def certificate_names(path: Path) -> tuple[str, str]:
    """(subject CN, issuer CN) of a PEM certificate, read with ``cryptography`` when it is
    installed (the provisioning extra), else with the stdlib's decoder. Raises OSError or
    ValueError for an unreadable or malformed file."""
    try:
        from cryptography import x509
        from cryptography.x509.oid import NameOID
    except ImportError:  # a gateway without the provisioning extra
        decoded = ssl._ssl._test_decode_cert(str(path))  # type: ignore[attr-defined]
        return _stdlib_cn(decoded.get("subject", ())), _stdlib_cn(decoded.get("issuer", ()))
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())

    def cn(name: x509.Name) -> str:
        attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(attrs[0].value) if attrs else ""

    return cn(cert.subject), cn(cert.issuer)


def _stdlib_cn(name: tuple[tuple[tuple[str, str], ...], ...]) -> str:
    return next((value for rdn in name for key, value in rdn if key == "commonName"), "")


def check_identity(cert_file: Path | None, config_file: str,
                   identities: list[tuple[str, str]]) -> None:
    """Before connecting: the client certificate's CN must be each configured id (the broker's
    ACL grants topics by that name, and an MQTT client id is a session: connecting under
    another gateway's id would push that gateway off the broker). Raises
    ``NotAuthorizedError`` (exit 77) naming the key, the id and the certificate's name; a
    certificate that cannot be read is left to the TLS setup to report."""
    from fedcore.errors import NotAuthorizedError

    if cert_file is None:
        return
    try:
        cn = certificate_names(cert_file)[0]
    except (OSError, ValueError):
        return
    for key, configured in identities:
        if configured != cn:
            raise NotAuthorizedError(
                f"{config_file}: key '{key}' = {configured!r}: the client certificate {cert_file} "
                f"is issued to {cn!r}; the broker would refuse this service's topics and the id "
                f"would take over another client's session. Set {key} = \"{cn}\", or provision "
                f"a certificate for {configured!r}")
