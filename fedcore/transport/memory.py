"""An in-process broker and transport, so adapter and runtime tests need no sockets.

Theory of operation
-------------------
:class:`MemoryBroker` keeps what a real broker keeps: sessions (subscriptions plus a queue
of QoS >= 1 messages for offline persistent clients), retained messages and last wills.
:class:`MemoryTransport` implements :class:`~fedcore.transport.base.Transport` on it.

Delivery is synchronous and deterministic: ``publish`` routes the message and calls every
matching subscriber's ``on_event`` before it returns, in the publisher's thread, under one
re-entrant lock (so a handler may publish in turn). There is no clock: the passage of time
between losing and regaining a connection is the test's ``drop_connection()`` ...
``reconnect()`` pair.

Semantics modelled (the ones runtimes rely on):

- ``+`` / ``#`` filters; one copy per client even when several of its filters match, at the
  highest matching QoS, capped by the publish QoS.
- Retained messages (an empty retained payload deletes) go to new subscribers with
  ``retained=True``; live deliveries carry ``retained=False`` as Mosquitto sends them.
- Persistent sessions: with ``clean_start=False`` and ``session_expiry > 0`` the session
  survives a disconnect; QoS >= 1 messages for it queue (QoS 0 ones are dropped) and arrive
  after reconnecting, up to ``max_queued_messages``.
- A publish on a dropped connection waits in the transport's outbox (as in paho) and is
  sent on reconnect with the same packet id; ``wait=`` then raises TransportError, since
  nothing can be acked. ``report_acks=True``: each QoS >= 1 publish the broker took is
  reported as ``PublishAcknowledged(mid, code)``.
- Last will on ``kill()`` / ``drop_connection()``; none on ``stop()``.
- ``authorize(client_id, action, topic)`` denies with reason code 135, like a Mosquitto ACL;
  a denied QoS >= 1 publish is also reported to the publisher as ``PublishDenied``.
- ``refuse_connections(reason, permanent=..., not_authorized=..., client_id=...)``: connection
  attempts (``start()``, ``reconnect()``, after ``restart()``) fail with ``ConnectFailed``
  until ``accept_connections()``, as a down broker, a wrong CA or a revoked certificate
  would make the paho transport report them. The transport stays disconnected; the test's
  ``reconnect()`` is the next attempt (``retry_in_s`` is None: there is no clock here).
- ``restart()``: like a Mosquitto restart without persistence: sessions and retained
  messages are lost, every live client sees Disconnected then Connected(False) and
  restores its subscriptions.
- Fault injection per publish: ``inject("drop" | "duplicate", topic_filter, count)`` for the
  next matching messages, or ``drop_rate`` / ``duplicate_rate`` drawn from ``rng``.

Byte counters count the size of the PUBLISH packets a transport sent / received
(:func:`~fedcore.transport.base.publish_packet_size`); connection packets and acks are not
modelled.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from fedcore.errors import LocalProtocolError, TransportError
from fedcore.transport.base import (
    REASON_NOT_AUTHORIZED,
    Connected,
    ConnectFailed,
    Disconnected,
    MessageReceived,
    PublishAcknowledged,
    PublishDenied,
    PublishResult,
    SubscriptionRefused,
    TransportEvent,
    Will,
    check_publish,
    check_qos,
    check_topic_filter,
    payload_limit_for,
    publish_packet_size,
    topic_matches,
)

Action = Literal["publish", "subscribe"]
Fault = Literal["drop", "duplicate"]
Authorize = Callable[[str, Action, str], bool]


@dataclass(frozen=True, slots=True)
class Published:
    """One message the broker accepted (kept in ``MemoryBroker.history`` for assertions)."""

    sender: str
    topic: str
    payload: bytes
    qos: int
    retain: bool


@dataclass
class _Session:
    subscriptions: dict[str, int] = field(default_factory=dict)
    queued: list[tuple[str, bytes, int]] = field(default_factory=list)
    transport: MemoryTransport | None = None
    expires_on_disconnect: bool = False


@dataclass
class _Injected:
    fault: Fault
    topic_filter: str
    remaining: int


class MemoryBroker:
    def __init__(
        self,
        *,
        max_packet_size: int | None = None,
        max_queued_messages: int = 10000,
        authorize: Authorize | None = None,
        drop_rate: float = 0.0,
        duplicate_rate: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        if (drop_rate or duplicate_rate) and rng is None:
            raise LocalProtocolError("drop_rate / duplicate_rate need an rng")
        self.max_packet_size = max_packet_size
        self.max_queued_messages = max_queued_messages
        self.authorize = authorize
        self.drop_rate = drop_rate
        self.duplicate_rate = duplicate_rate
        self.rng = rng
        self.retained: dict[str, tuple[bytes, int]] = {}
        self.history: list[Published] = []
        self.dropped = 0  # messages lost to fault injection or full queues
        self._sessions: dict[str, _Session] = {}
        self._faults: list[_Injected] = []
        self._refusals: dict[str | None, tuple[str, bool, bool]] = {}  # client id (None: all)
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ test controls

    def inject(self, fault: Fault, topic_filter: str = "#", count: int = 1) -> None:
        """Drop or duplicate the next ``count`` messages whose topic matches."""
        check_topic_filter(topic_filter)
        with self._lock:
            self._faults.append(_Injected(fault, topic_filter, count))

    def refuse_connections(
        self,
        reason: str = "connection refused (is the broker running?)",
        *,
        permanent: bool = False,
        not_authorized: bool = False,
        client_id: str | None = None,
    ) -> None:
        """Make connection attempts fail (of ``client_id``, or of everyone) until
        ``accept_connections()``. Live connections are not touched: pair it with
        ``restart()`` or ``drop_connection()`` to model a broker that goes and stays away."""
        ConnectFailed("", reason, permanent, not_authorized)  # validates the combination
        with self._lock:
            self._refusals[client_id] = (reason, permanent, not_authorized)

    def accept_connections(self, client_id: str | None = None) -> None:
        with self._lock:
            self._refusals.pop(client_id, None)

    def _refusal(self, client_id: str) -> tuple[str, bool, bool] | None:
        with self._lock:
            return self._refusals.get(client_id) or self._refusals.get(None)

    def connected_clients(self) -> list[str]:
        with self._lock:
            return sorted(cid for cid, s in self._sessions.items() if s.transport is not None)

    def queued_for(self, client_id: str) -> int:
        with self._lock:
            session = self._sessions.get(client_id)
            return len(session.queued) if session else 0

    def restart(self) -> None:
        """Lose every session and retained message; live clients reconnect at once."""
        with self._lock:
            live = [s.transport for s in self._sessions.values() if s.transport is not None]
            for transport in live:
                transport._lost("connection lost: broker restarted", send_will=False)
            self._sessions.clear()
            self.retained.clear()
            for transport in live:
                transport.reconnect()

    # ------------------------------------------------------------------ transport side

    def _connect(self, transport: MemoryTransport) -> bool:
        with self._lock:
            old = self._sessions.get(transport.client_id)
            if old is not None and old.transport is not None and old.transport is not transport:
                old.transport._lost("connection lost: session taken over")  # MQTT takeover
            present = old is not None and not transport.clean_start
            session = old if present and old is not None else _Session()
            session.transport = transport
            session.expires_on_disconnect = transport.session_expiry == 0
            self._sessions[transport.client_id] = session
            return present

    def _after_connect(self, client_id: str) -> None:
        with self._lock:
            session = self._sessions[client_id]
            queued, session.queued = session.queued, []
            for topic, payload, qos in queued:
                self._deliver(session, topic, payload, qos, retained=False)

    def _disconnect(self, transport: MemoryTransport, send_will: bool) -> None:
        with self._lock:
            session = self._sessions.get(transport.client_id)
            if session is None or session.transport is not transport:
                return
            session.transport = None
            if session.expires_on_disconnect:
                del self._sessions[transport.client_id]
            if send_will and transport.will is not None:
                will = transport.will
                self._route(transport.client_id, will.topic, will.payload, will.qos, will.retain)

    def _subscribe(self, transport: MemoryTransport, topic_filter: str, qos: int) -> bool:
        with self._lock:
            if self.authorize and not self.authorize(transport.client_id, "subscribe", topic_filter):
                return False
            session = self._sessions[transport.client_id]
            session.subscriptions[topic_filter] = qos
            for topic, (payload, retained_qos) in sorted(self.retained.items()):
                if topic_matches(topic_filter, topic):
                    self._deliver(session, topic, payload, min(qos, retained_qos), retained=True)
            return True

    def _publish(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        with self._lock:
            if self.authorize and not self.authorize(sender, "publish", topic):
                return REASON_NOT_AUTHORIZED
            self._route(sender, topic, payload, qos, retain)
            return 0

    def _route(self, sender: str, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        fault = self._take_fault(topic)
        if fault == "drop":
            self.dropped += 1
            return
        self.history.append(Published(sender, topic, payload, qos, retain))
        if retain:
            if payload:
                self.retained[topic] = (payload, qos)
            else:
                self.retained.pop(topic, None)
        copies = 2 if fault == "duplicate" else 1
        for session in list(self._sessions.values()):
            granted = [q for f, q in session.subscriptions.items() if topic_matches(f, topic)]
            if not granted:
                continue
            effective = min(qos, max(granted))
            for _ in range(copies):
                self._deliver(session, topic, payload, effective, retained=False)

    def _take_fault(self, topic: str) -> Fault | None:
        for injected in self._faults:
            if injected.remaining > 0 and topic_matches(injected.topic_filter, topic):
                injected.remaining -= 1
                if injected.remaining == 0:
                    self._faults.remove(injected)
                return injected.fault
        if self.rng is not None:
            if self.drop_rate and self.rng.random() < self.drop_rate:
                return "drop"
            if self.duplicate_rate and self.rng.random() < self.duplicate_rate:
                return "duplicate"
        return None

    def _deliver(self, session: _Session, topic: str, payload: bytes, qos: int, retained: bool) -> None:
        if session.transport is not None:
            session.transport._receive(topic, payload, qos, retained)
        elif qos > 0:
            if len(session.queued) >= self.max_queued_messages:
                self.dropped += 1
                return
            session.queued.append((topic, payload, qos))


class MemoryTransport:
    """A :class:`~fedcore.transport.base.Transport` on a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        clean_start: bool = False,
        session_expiry: int = 3600,
        will: Will | None = None,
        max_payload: int = 8 * 1024 * 1024,
        url: str = "mqtt://memory:1883",
        report_acks: bool = False,
    ) -> None:
        self.broker = broker
        self.client_id = client_id
        self.url = url
        self.clean_start = clean_start
        self.session_expiry = session_expiry
        self.will = will
        self._max_payload = max_payload
        self._on_event: Callable[[TransportEvent], None] | None = None
        self._connected = False
        self._dead = False
        self._subs: dict[str, int] = {}
        self._unsent: set[str] = set()
        self._outbox: list[tuple[int, str, bytes, int, bool]] = []
        self._report_acks = report_acks
        self._last_mid = 0
        self._sent = 0
        self._received = 0

    @property
    def bytes_sent(self) -> int:
        return self._sent

    @property
    def bytes_received(self) -> int:
        return self._received

    @property
    def connected(self) -> bool:
        return self._connected

    def start(self, on_event: Callable[[TransportEvent], None]) -> None:
        if self._on_event is not None:
            raise LocalProtocolError("transport already started")
        self._on_event = on_event
        self._connect()

    def payload_limit(self, topic: str, qos: int = 1) -> int:
        return payload_limit_for(topic, qos, self._max_payload, self.broker.max_packet_size)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: float | None = None,
    ) -> PublishResult:
        check_publish(topic, payload, qos, self.payload_limit(topic, qos))
        if self._dead:
            raise LocalProtocolError(f"{self.client_id}: publish after kill()/stop()")
        self._last_mid = self._last_mid % 65535 + 1  # packet ids 1..65535, as in MQTT
        mid = self._last_mid
        if not self._connected:
            if qos > 0:
                self._outbox.append((mid, topic, bytes(payload), qos, retain))
            if wait is not None and qos > 0:
                raise TransportError(f"no PUBACK for {topic!r} within {wait} s (disconnected)")
            return PublishResult(mid)
        code = self._send(mid, topic, payload, qos, retain)
        return PublishResult(mid, code if wait is not None and qos > 0 else None)

    def _send(self, mid: int, topic: str, payload: bytes, qos: int, retain: bool) -> int:
        self._sent += publish_packet_size(topic, len(payload), qos)
        code = self.broker._publish(self.client_id, topic, bytes(payload), qos, retain)
        if qos > 0 and self._report_acks:
            self._emit(PublishAcknowledged(mid, code))
        if qos > 0 and code >= 0x80:
            self._emit(PublishDenied(topic, code))
        return code

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        check_topic_filter(topic_filter)
        check_qos(qos)
        self._subs[topic_filter] = qos
        if self._connected:
            self._send_subscribe(topic_filter, qos)
        else:
            self._unsent.add(topic_filter)

    def stop(self) -> None:
        """Clean disconnect: the broker discards the will."""
        if self._connected:
            self.broker._disconnect(self, send_will=False)
            self._connected = False
            self._emit(Disconnected("stopped"))
        self._dead = True

    # ------------------------------------------------------------------ test controls

    def kill(self) -> None:
        """The process died: the broker publishes the will; no more events here."""
        if self._connected:
            self._connected = False
            self.broker._disconnect(self, send_will=True)
        self._dead = True

    def drop_connection(self) -> None:
        """The network failed: will published, Disconnected delivered; ``reconnect()``
        later models the transport's automatic reconnect."""
        if self._connected:
            self._lost("connection lost: network")

    def reconnect(self) -> None:
        if self._dead:
            raise LocalProtocolError(f"{self.client_id}: reconnect after kill()/stop()")
        if not self._connected:
            self._connect()

    # ------------------------------------------------------------------ broker side

    def _connect(self) -> None:
        refusal = self.broker._refusal(self.client_id)
        if refusal is not None:
            reason, permanent, not_authorized = refusal
            self._emit(ConnectFailed(self.url, reason, permanent, not_authorized))
            return
        present = self.broker._connect(self)
        self._connected = True
        # Like the paho transport: restore everything if the session is gone, else only
        # what was added while offline; then report the session.
        todo = sorted(self._unsent) if present else list(self._subs)
        self._unsent.clear()
        for topic_filter in todo:
            if topic_filter in self._subs:
                self._send_subscribe(topic_filter, self._subs[topic_filter])
        self._emit(Connected(present))
        self.broker._after_connect(self.client_id)
        outbox, self._outbox = self._outbox, []
        for mid, topic, payload, qos, retain in outbox:  # same packet id, as paho resends
            if self._connected:
                self._send(mid, topic, payload, qos, retain)
            else:
                self._outbox.append((mid, topic, payload, qos, retain))

    def _lost(self, reason: str, send_will: bool = True) -> None:
        self._connected = False
        self.broker._disconnect(self, send_will=send_will)
        self._emit(Disconnected(reason))

    def _send_subscribe(self, topic_filter: str, qos: int) -> None:
        if not self.broker._subscribe(self, topic_filter, qos):
            self._subs.pop(topic_filter, None)
            self._emit(SubscriptionRefused(topic_filter, REASON_NOT_AUTHORIZED))

    def _receive(self, topic: str, payload: bytes, qos: int, retained: bool) -> None:
        self._received += publish_packet_size(topic, len(payload), qos)
        self._emit(MessageReceived(topic, payload, retained))

    def _emit(self, event: TransportEvent) -> None:
        if self._on_event is not None and not self._dead:
            self._on_event(event)
