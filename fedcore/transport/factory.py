"""Build the broker transport a service's config asks for (used by the service mains)."""

from __future__ import annotations

import random

from fedcore.service_config import BrokerConfig
from fedcore.transport.base import TlsSettings, Will
from fedcore.transport.paho import PahoTransport


def transport_from_config(broker: BrokerConfig, will: Will | None = None, seed: int | None = None) -> PahoTransport:
    tls = None
    if broker.url.startswith("mqtts://"):
        tls = TlsSettings(broker.ca_file, broker.cert_file, broker.key_file)
    return PahoTransport(
        broker.url,
        broker.client_id,
        will=will,
        tls=tls,
        max_payload=broker.max_payload,
        rng=random.Random(seed),
    )
