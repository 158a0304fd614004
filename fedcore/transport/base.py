"""The transport interface: the one seam between fedgate's services and an MQTT broker.

Theory of operation
-------------------
Every service runs a single-threaded event loop fed by a thread-safe queue. A transport
owns its own network thread; it connects in the background, and delivers
:data:`TransportEvent` values (``Connected``, ``Disconnected``, ``MessageReceived``, ...)
by calling the ``on_event`` callback *from that thread*. The callback should do nothing
but put the event on the service's queue. The service calls ``publish`` / ``subscribe``
from its own thread.

Guarantees every implementation gives:

- **Sessions survive reconnects.** Subscriptions are remembered and restored whenever the
  broker reports that the session is not present; QoS 1 messages published to us while we
  were offline arrive after reconnecting (persistent session).
- **Sizes are checked before sending.** A payload that would make a PUBLISH packet larger
  than the broker's Maximum Packet Size (CONNACK property; else the configured limit)
  raises :class:`PayloadTooLargeError`. Callers chunk large payloads themselves and ask
  :meth:`Transport.payload_limit` how big a chunk may be.
- **A denied publish is visible.** With ``wait`` set, ``publish`` blocks until the PUBACK
  and returns its MQTT v5 reason code; ``PublishResult.denied`` is True for codes >= 0x80
  (135: not authorized by the ACL). Whether or not anyone waits, a denied PUBACK is also
  reported as a :class:`PublishDenied` event naming the topic. A transport built with
  ``report_acks=True`` reports every PUBACK as :class:`PublishAcknowledged` with the
  packet id ``publish`` returned, so a caller can keep a message until the broker has it.
- **A failed connection attempt says why.** Every attempt that does not end in a CONNACK
  success is reported as a :class:`ConnectFailed` event with the real reason, whether
  retrying can help (``permanent``) and the delay before the next attempt. The transport
  keeps retrying either way: whether to give up is the runtime's decision
  (:mod:`fedcore.transport.connection`).
- **A clean stop is clean.** ``stop()`` sends DISCONNECT, so the broker discards the last
  will; the will is published only when the connection dies.

This module is pure: value types, URL parsing and the arithmetic of packet sizes and
reconnect backoff. Implementations: :mod:`fedcore.transport.paho` (a real broker) and
:mod:`fedcore.transport.memory` (in-process, for tests).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from fedcore.errors import LocalProtocolError

# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Connected:
    """The broker accepted our CONNECT. ``session_present``: it kept our old session."""

    session_present: bool


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended (``reason`` says why); the transport reconnects by itself
    unless ``stop()`` was called."""

    reason: str


@dataclass(frozen=True, slots=True)
class MessageReceived:
    """A PUBLISH arrived. ``retained``: it was stored by the broker before we subscribed.
    ``arrived``: wall-clock time the transport took it off the socket (0 when unknown)."""

    topic: str
    payload: bytes
    retained: bool
    arrived: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class SubscriptionRefused:
    """The broker refused a subscription (SUBACK reason code >= 0x80, e.g. 135)."""

    topic_filter: str
    reason_code: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    """A connection attempt failed before the broker accepted us.

    ``reason`` is the real cause in words (refused, timed out, certificate not trusted...).
    ``permanent``: retrying cannot help until someone changes a file, a certificate or the
    broker (TLS verification, a refused certificate, a CONNACK refusal); transient causes
    (refused port, unreachable host, timeout, DNS) may pass. ``not_authorized``: the
    permanent cause is the broker refusing *us* (our certificate or credentials), not our
    own configuration. ``retry_in_s``: when the transport tries again (None: unknown)."""

    url: str
    reason: str
    permanent: bool
    not_authorized: bool = False
    retry_in_s: float | None = None

    def __post_init__(self) -> None:
        if self.not_authorized and not self.permanent:
            raise LocalProtocolError("ConnectFailed: not_authorized implies permanent")


@dataclass(frozen=True, slots=True)
class PublishDenied:
    """The broker answered a QoS >= 1 publish with a PUBACK reason code >= 0x80 (135: not
    authorized by the ACL). The message was dropped."""

    topic: str
    reason_code: int

    @property
    def reason(self) -> str:
        return REASON_NAMES.get(self.reason_code, f"reason code {self.reason_code}")


@dataclass(frozen=True, slots=True)
class PublishAcknowledged:
    """The broker answered our QoS >= 1 publish with packet id ``mid`` (the ``mid`` of its
    :class:`PublishResult`). Reported only by transports built with ``report_acks=True``:
    a caller that keeps a message until the broker has it (the gateway's spool) learns
    here when to let go. ``reason_code`` >= 0x80 means refused (also a PublishDenied)."""

    mid: int
    reason_code: int

    @property
    def refused(self) -> bool:
        return self.reason_code >= 0x80


TransportEvent = (
    Connected | Disconnected | MessageReceived | SubscriptionRefused | ConnectFailed | PublishDenied
    | PublishAcknowledged
)

# --------------------------------------------------------------------------- values

REASON_NOT_AUTHORIZED = 135
REASON_NAMES: dict[int, str] = {
    0: "success",
    16: "no matching subscribers",
    128: "unspecified error",
    131: "implementation specific error",
    135: "not authorized",
    144: "topic name invalid",
    149: "packet too large",
    151: "quota exceeded",
    153: "payload format invalid",
}


@dataclass(frozen=True, slots=True)
class PublishResult:
    """What became of a publish. ``reason_code`` is None when we did not wait for the
    PUBACK (``wait=None``, or QoS 0, which has no PUBACK)."""

    mid: int
    reason_code: int | None = None

    @property
    def denied(self) -> bool:
        return self.reason_code is not None and self.reason_code >= 0x80

    @property
    def reason(self) -> str:
        if self.reason_code is None:
            return "not acknowledged yet"
        return REASON_NAMES.get(self.reason_code, f"reason code {self.reason_code}")


@dataclass(frozen=True, slots=True)
class BrokerUrl:
    """``mqtt://host:port`` (plain TCP, default port 1883) or ``mqtts://host:port``
    (TLS, default port 8883)."""

    scheme: str
    host: str
    port: int

    @property
    def tls(self) -> bool:
        return self.scheme == "mqtts"

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        def bad(problem: str) -> LocalProtocolError:
            return LocalProtocolError(
                f"broker url {url!r}: {problem} (expected mqtt://host:port or mqtts://host:port)"
            )

        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise bad(str(exc)) from exc
        if parts.scheme not in ("mqtt", "mqtts"):
            raise bad(f"unknown scheme {parts.scheme!r}")
        if not parts.hostname:
            raise bad("missing host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise bad("unexpected path or query")
        if parts.username is not None or parts.password is not None:
            raise bad("credentials do not belong in the url")
        if port == 0:
            raise bad("port 0")
        default = 8883 if parts.scheme == "mqtts" else 1883
        return cls(parts.scheme, parts.hostname, port if port is not None else default)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class TlsSettings:
    """mTLS material. ``ca_file`` None means the system trust store; cert and key are
    given together or not at all."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise LocalProtocolError("TlsSettings: cert_file and key_file go together")


@dataclass(frozen=True, slots=True)
class Will:
    """The last will: published by the broker when our connection dies without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


class PayloadTooLargeError(LocalProtocolError):
    """A publish would exceed the broker's Maximum Packet Size. Our bug: the caller must
    chunk payloads larger than :meth:`Transport.payload_limit`."""

    def __init__(self, topic: str, payload_size: int, limit: int) -> None:
        self.topic = topic
        self.payload_size = payload_size
        self.limit = limit
        super().__init__(
            f"payload of {payload_size} bytes for {topic!r} exceeds the limit of {limit} bytes "
            "(broker Maximum Packet Size or configured max_payload); chunk it"
        )


# --------------------------------------------------------------------------- interface


class Transport(Protocol):
    """What every runtime uses to talk MQTT. See the module docstring for guarantees."""

    @property
    def bytes_sent(self) -> int:
        """Bytes we sent to the broker (what exactly is counted is documented per class)."""
        ...

    @property
    def bytes_received(self) -> int: ...

    def start(self, on_event: Callable[[TransportEvent], None]) -> None:
        """Connect in the background; events are delivered from the transport's thread."""
        ...

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: float | None = None,
    ) -> PublishResult:
        """Queue a PUBLISH. With ``wait`` (seconds) and QoS >= 1, block until the PUBACK
        arrives and return its reason code; raise TransportError when it does not arrive
        in time. Raises PayloadTooLargeError before sending anything oversized."""
        ...

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        """Subscribe now if connected; in any case remember it and restore it after a
        reconnect that lost the session."""
        ...

    def payload_limit(self, topic: str, qos: int = 1) -> int:
        """The largest payload that may be published to ``topic`` right now."""
        ...

    def stop(self) -> None:
        """Disconnect cleanly (no last will) and stop the network thread."""
        ...


# --------------------------------------------------------------------------- arithmetic


def _varint_len(n: int) -> int:
    length = 1
    while n >= 128:
        n //= 128
        length += 1
    return length


def publish_packet_size(topic: str, payload_size: int, qos: int) -> int:
    """Size on the wire of an MQTT v5 PUBLISH without properties: fixed header, topic
    (2-byte length + UTF-8), packet id (QoS > 0), empty property length, payload."""
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + 1 + payload_size
    return 1 + _varint_len(remaining) + remaining


def payload_limit_for(
    topic: str, qos: int, configured_max_payload: int, broker_max_packet: int | None
) -> int:
    """Largest payload allowed: the configured cap, and what fits in the broker's maximum
    packet size (when it announced one)."""
    limit = configured_max_payload
    if broker_max_packet is not None:
        overhead = publish_packet_size(topic, 0, qos)
        # Grow the payload estimate once: the varint header can gain a byte or two.
        fit = broker_max_packet - overhead
        while fit > 0 and publish_packet_size(topic, fit, qos) > broker_max_packet:
            fit -= 1
        limit = min(limit, max(fit, 0))
    return limit


def check_qos(qos: int) -> None:
    if qos not in (0, 1, 2):
        raise LocalProtocolError(f"qos must be 0, 1 or 2, not {qos!r}")


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT filter matching with ``+`` (one level) and ``#`` (the rest, including the
    parent level). Topics starting with ``$`` are not matched by leading wildcards."""
    if topic.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    f_parts = topic_filter.split("/")
    t_parts = topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return i == len(f_parts) - 1
        if i >= len(t_parts):
            return False
        if part != "+" and part != t_parts[i]:
            return False
    return len(f_parts) == len(t_parts)


def check_publish(topic: str, payload: bytes, qos: int, limit: int) -> None:
    """What every transport checks before a PUBLISH leaves (our bugs, so raise)."""
    check_qos(qos)
    check_topic_name(topic)
    if len(payload) > limit:
        raise PayloadTooLargeError(topic, len(payload), limit)


def check_topic_filter(topic_filter: str) -> None:
    """Reject filters the broker would refuse (our bug, so raise rather than send)."""
    parts = topic_filter.split("/")
    if not topic_filter:
        raise LocalProtocolError("empty topic filter")
    for i, part in enumerate(parts):
        if "#" in part and (part != "#" or i != len(parts) - 1):
            raise LocalProtocolError(f"topic filter {topic_filter!r}: '#' must be a whole last level")
        if "+" in part and part != "+":
            raise LocalProtocolError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def check_topic_name(topic: str) -> None:
    if not topic or "+" in topic or "#" in topic:
        raise LocalProtocolError(f"topic name {topic!r} must be non-empty and have no wildcards")


@dataclass(frozen=True, slots=True)
class Backoff:
    """Capped exponential reconnect backoff with jitter. Attempt ``n`` (0-based) waits a
    uniform time in ``[cap/2, cap]`` with ``cap = min(maximum, minimum * 2**n)``: the upper
    half keeps the growth, the randomness spreads a fleet's reconnects after a broker
    restart so they do not arrive in one burst."""

    minimum: float = 0.5
    maximum: float = 30.0

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum:
            raise LocalProtocolError(
                f"backoff: need 0 < minimum <= maximum, got {self.minimum}, {self.maximum}"
            )

    def delay(self, attempt: int, rng: random.Random) -> float:
        cap = min(self.maximum, self.minimum * 2.0 ** min(attempt, 60))
        return rng.uniform(cap / 2.0, cap)
