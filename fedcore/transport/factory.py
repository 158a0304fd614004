"""Build the broker transport a service's config asks for (used by the service mains)."""

from __future__ import annotations

import os
import random

from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.service_config import BrokerConfig
from fedcore.transport.base import BrokerUrl, TlsSettings, Will
from fedcore.transport.paho import DEFAULT_CONNECT_TIMEOUT, PahoTransport
from fedcore.transport.tls import NO_CONFIG_FILE


def broker_url(broker: BrokerConfig) -> BrokerUrl:
    try:
        return BrokerUrl.parse(broker.url)
    except LocalProtocolError as exc:
        raise ConfigError(broker.file or NO_CONFIG_FILE, "broker.url", broker.url, str(exc)) from None


def tls_settings(broker: BrokerConfig) -> TlsSettings | None:
    if not broker.url.startswith("mqtts://"):
        return None
    return TlsSettings(broker.ca_file, broker.cert_file, broker.key_file)


def transport_from_config(
    broker: BrokerConfig,
    will: Will | None = None,
    seed: int | None = None,
    *,
    client_id: str | None = None,
    clean_start: bool = False,
    session_expiry: int = 3600,
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
    backoff: tuple[float, float] = (0.5, 30.0),
    auth_probe: bool = False,
    report_acks: bool = False,
) -> PahoTransport:
    """The service's transport. A missing or unreadable ``ca_file`` / ``cert_file`` /
    ``key_file`` (or a key that does not belong to the certificate) raises ConfigError
    naming ``broker.FILE_KEY`` in ``broker.file`` before anything connects.

    ``client_id`` and the session options exist for ``fedgate config check --live``, which
    connects beside a running service without taking over its session. The reconnect jitter
    comes from the OS unless ``seed`` is given (tests): a fleet that restarts together must
    not retry in lockstep. ``report_acks``: report every PUBACK as an event (the gateway's
    spool keeps a message until then)."""
    return PahoTransport(
        broker_url(broker),
        broker.client_id if client_id is None else client_id,
        will=will,
        tls=tls_settings(broker),
        max_payload=broker.max_payload,
        clean_start=clean_start,
        session_expiry=session_expiry,
        connect_timeout=connect_timeout,
        backoff_min=backoff[0],
        backoff_max=backoff[1],
        config_file=broker.file or NO_CONFIG_FILE,
        report_acks=report_acks,
        rng=random.Random(seed if seed is not None else os.urandom(8)),
        auth_probe=auth_probe,
    )
