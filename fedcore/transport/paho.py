"""The MQTT v5 transport over paho-mqtt 2.x: the only code in fedcore that touches sockets.

Theory of operation
-------------------
``start()`` calls paho's ``connect_async`` + ``loop_start``: paho's network thread
connects, reads and writes, and runs our callbacks, which turn paho's callbacks into
:data:`~fedcore.transport.base.TransportEvent` values handed to ``on_event``. Nothing else
runs on that thread.

- **Persistent session.** Every CONNECT carries ``clean_start`` (False by default, on the
  first connect too; paho's default would start clean once) and a Session Expiry Interval,
  so the broker keeps our subscriptions and queues QoS 1 messages while we are offline.
  When CONNACK says the session is gone (broker restarted, session expired) we resubscribe
  every remembered filter; when it is present we only send filters added while offline.
- **Reconnects** are paho's own loop, but the wait between attempts is ours: paho's
  ``reconnect_delay_set`` has no jitter, so
  :class:`~fedcore.transport.paho_client.HookedClient` overrides paho's
  ``_reconnect_wait`` hook with :class:`~fedcore.transport.base.Backoff` (capped,
  exponential, jittered with the injected ``rng``) that ``stop()`` can interrupt. QoS 1
  messages published while offline stay in paho's queue and are sent after reconnecting.
- **Failed attempts say why.** paho's loop catches connection errors and logs them at
  debug level only. An attempt starts in ``_create_socket``; it fails there (TCP, DNS, TLS
  verification of the broker), on a read before the CONNACK (TLS 1.3: the broker's alert
  refusing our certificate), with a CONNACK refusal, or when no CONNACK comes within
  ``connect_timeout``. Each failure becomes exactly one
  :class:`~fedcore.transport.base.ConnectFailed` (classified by
  :mod:`fedcore.transport.failures`) carrying the delay before the next attempt, which is
  drawn when the attempt fails and then waited for (``paho_client.Attempts``). Each is
  logged at INFO with that delay; the operator-facing line is the runtime's
  (:mod:`fedcore.transport.connection`).
- **TLS files are checked before connecting** (:func:`fedcore.transport.tls.tls_context`):
  a missing or unreadable file raises ConfigError naming the config key.
- **TCP_NODELAY** is set on the TCP socket (under the TLS layer when there is one): paho
  does not, and small QoS 1 exchanges would otherwise wait for delayed ACKs (~40 ms each).
- **PUBACK reason codes** arrive in ``on_publish``; a publish with ``wait`` blocks on a
  condition until its packet id shows up (the last acks are kept in a small bounded map
  so a PUBACK that overtakes the waiter is not lost). A code >= 0x80 is also reported as
  :class:`~fedcore.transport.base.PublishDenied` with the topic, remembered per packet id.
  With ``report_acks`` every ``on_publish`` is also reported as
  :class:`~fedcore.transport.base.PublishAcknowledged` (packet id, code); paho keeps an
  unacknowledged QoS 1 message and resends it with the same packet id after a reconnect,
  so the packet id ``publish`` returned names the message until its PUBACK. (paho also
  calls ``on_publish`` when a QoS 0 message is written: callers track only their own ids.)
- **Byte counters** count every MQTT byte written to / read from the connection (all
  packet types: CONNECT, PUBLISH, acks, pings), after TLS decryption; TLS records and
  TCP/IP headers are not counted (``HookedClient``'s ``_sock_send`` / ``_sock_recv``).
- **Size check.** paho does not check the broker's Maximum Packet Size (an oversized QoS 1
  message loops through reconnects), so ``publish`` checks it first. The other way, the
  CONNECT announces our own Maximum Packet Size (``max_payload`` + 64 KiB of headers): a
  broker without a size limit drops a larger message for this client instead of handing
  it over, so it never reaches our memory.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fedcore.errors import LocalProtocolError, TransportError
from fedcore.transport import failures
from fedcore.transport.base import (
    Backoff,
    BrokerUrl,
    Connected,
    ConnectFailed,
    Disconnected,
    MessageReceived,
    PublishAcknowledged,
    PublishDenied,
    PublishResult,
    SubscriptionRefused,
    TlsSettings,
    TransportEvent,
    Will,
    check_publish,
    check_qos,
    check_topic_filter,
    payload_limit_for,
)
from fedcore.transport.paho_client import Attempts, HookedClient
from fedcore.transport.tls import NO_CONFIG_FILE, tls_context

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
PACKET_HEADROOM = 64 * 1024  # fixed header, topic and properties on top of a payload
DEFAULT_CONNECT_TIMEOUT = 5.0
# `auth_probe`: a CONNECT naming an authentication method no broker offers. A broker that
# checks TLS client certificates answers CONNACK 140 only after accepting ours, and opens
# no session, so a running service with the same identity keeps its own (decision 23).
AUTH_PROBE_METHOD = "fedgate-probe"
BAD_AUTHENTICATION_METHOD = 140
_ACKS_KEPT = 1024


class PahoTransport:
    """A :class:`~fedcore.transport.base.Transport` over a real MQTT v5 broker.

    ``connect_timeout`` bounds each step of an attempt: the TCP connect, the TLS handshake
    and the wait for the CONNACK. ``config_file`` is named in the ConfigError raised for a
    missing or unreadable TLS file."""

    def __init__(
        self,
        url: str | BrokerUrl,
        client_id: str,
        *,
        clean_start: bool = False,
        session_expiry: int = 3600,
        keepalive: int = 30,
        will: Will | None = None,
        tls: TlsSettings | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        backoff_min: float = 0.5,
        backoff_max: float = 30.0,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        config_file: str = NO_CONFIG_FILE,
        report_acks: bool = False,
        rng: random.Random,
        auth_probe: bool = False,
    ) -> None:
        self.url = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
        if tls is not None and not self.url.tls:
            raise LocalProtocolError(f"TLS settings given for the plain url {self.url}")
        if max_payload <= 0 or session_expiry < 0 or keepalive <= 0 or connect_timeout <= 0:
            raise LocalProtocolError(
                "max_payload, keepalive and connect_timeout must be > 0, session_expiry >= 0"
            )
        self.client_id = client_id
        self.auth_probe = auth_probe
        self._report_acks = report_acks
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._max_payload = max_payload
        self._stopping = threading.Event()
        self._on_event: Callable[[TransportEvent], None] | None = None
        self._broker_max_packet: int | None = None
        self.attempts = Attempts(self.url, tls if self.url.tls else None, connect_timeout,
                                 Backoff(backoff_min, backoff_max), rng)

        self._counter_lock = threading.Lock()
        self._sent = 0
        self._received = 0

        # Subscriptions: filter -> qos; `_unsent` were added while offline.
        self._sub_lock = threading.Lock()
        self._connected = False
        self._subs: dict[str, int] = {}
        self._unsent: set[str] = set()
        self._sub_mids: dict[int, str] = {}

        # Acks: PUBACK / SUBACK codes by packet id; topics of QoS >= 1 publishes by packet id.
        self._acks = threading.Condition()
        self._ack_codes: OrderedDict[int, int] = OrderedDict()
        self._suback_codes: OrderedDict[int, int] = OrderedDict()
        self._mid_topics: dict[int, str] = {}
        self._early_acks: OrderedDict[int, int] = OrderedDict()  # PUBACKs before _remember_topic

        self._client = HookedClient(self, client_id)
        self._client.connect_timeout = connect_timeout
        if self.url.tls:
            self._client.tls_set_context(tls_context(tls or TlsSettings(), config_file))
        if will is not None:
            check_qos(will.qos)
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    # ------------------------------------------------------------------ public API

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
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry
        # the broker must not send us more (MQTT 5: it drops what is larger for this
        # client), so an oversized message never reaches our memory
        props.MaximumPacketSize = self._max_payload + PACKET_HEADROOM
        if self.auth_probe:
            props.AuthenticationMethod = AUTH_PROBE_METHOD
        self._client.connect_async(
            self.url.host,
            self.url.port,
            keepalive=self._keepalive,
            clean_start=self._clean_start,
            properties=props,
        )
        self._client.loop_start()

    def payload_limit(self, topic: str, qos: int = 1) -> int:
        return payload_limit_for(topic, qos, self._max_payload, self._broker_max_packet)

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        retain: bool = False,
        wait: float | None = None,
    ) -> PublishResult:
        check_publish(topic, payload, qos, self.payload_limit(topic, qos))
        if wait is not None and threading.current_thread() is self._client._thread:
            raise LocalProtocolError("publish(wait=...) from the network thread would deadlock")
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise TransportError(f"publish to {topic!r}: outgoing queue full")
        self._remember_topic(info.mid, topic)  # QoS 0 too: paho reports it sent in on_publish
        if wait is None or qos == 0:
            return PublishResult(info.mid)
        with self._acks:
            if not self._acks.wait_for(lambda: info.mid in self._ack_codes, timeout=wait):
                # paho keeps the message queued; it is still sent after a reconnect.
                state = "connected" if self._connected else "disconnected"
                raise TransportError(f"no PUBACK for {topic!r} within {wait} s ({state})")
            code = self._ack_codes.pop(info.mid)
        return PublishResult(info.mid, code)

    def subscribe(self, topic_filter: str, qos: int = 1) -> None:
        check_topic_filter(topic_filter)
        check_qos(qos)
        with self._sub_lock:
            self._subs[topic_filter] = qos
            self._unsent.add(topic_filter)
            if self._connected:
                self._send_subscriptions([topic_filter])

    def check_subscription(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> int:
        """Ask the broker whether we may subscribe to ``topic_filter`` and return the SUBACK
        reason code (0-2: granted QoS; >= 0x80: refused). Nothing is remembered or restored
        after a reconnect, and retained messages are not sent (MQTT v5 retain handling 2):
        for checks (``fedgate config check --live``), not for receiving."""
        check_topic_filter(topic_filter)
        check_qos(qos)
        if not self._connected:
            raise TransportError(f"cannot check the subscription {topic_filter!r}: not connected")
        options = SubscribeOptions(qos=qos, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        rc, mid = self._client.subscribe(topic_filter, options=options)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            raise TransportError(f"cannot send SUBSCRIBE for {topic_filter!r}: {rc}")
        with self._acks:
            if not self._acks.wait_for(lambda: mid in self._suback_codes, timeout=timeout):
                raise TransportError(f"no SUBACK for {topic_filter!r} within {timeout} s")
            return self._suback_codes.pop(mid)

    def stop(self) -> None:
        self._stopping.set()
        self._client.disconnect()  # DISCONNECT reason 0: the broker discards the will
        self._client.loop_stop()
        with self._sub_lock:
            self._connected = False

    # ------------------------------------------------------------------ connection attempts
    # Called on paho's thread by HookedClient and the callbacks below.

    def _attempt_failed(self, exc: BaseException | None) -> None:
        self._report_failure(self.attempts.failed(exc))

    def _report_failure(self, event: ConnectFailed) -> None:
        if self._stopping.is_set():
            return
        log.info("%s: cannot connect to %s: %s; next attempt in %.2f s",
                 self.client_id, self.url, event.reason, event.retry_in_s)
        self._emit(event)

    def _wait_before_reconnect(self) -> None:
        delay, announced = self.attempts.take_delay()
        if not announced:
            log.info("%s: reconnecting to %s in %.2f s", self.client_id, self.url, delay)
        self._stopping.wait(delay)

    # ------------------------------------------------------------------ paho callbacks

    def _emit(self, event: TransportEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # an exception would kill paho's network thread
            log.exception("transport event handler failed on %r", event)

    def _count(self, sent: int = 0, received: int = 0) -> None:
        with self._counter_lock:
            self._sent += sent
            self._received += received

    def _send_subscriptions(self, filters: list[str]) -> None:
        """Called with ``_sub_lock`` held."""
        for topic_filter in filters:
            rc, mid = self._client.subscribe(topic_filter, qos=self._subs[topic_filter])
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._unsent.discard(topic_filter)
                self._sub_mids[mid] = topic_filter

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        if reason_code.is_failure:
            code = int(reason_code.value)
            if self.auth_probe and code == BAD_AUTHENTICATION_METHOD:
                # the answer the probe asks for: TLS and certificate accepted, no session
                self.attempts.succeeded()
                self._emit(Connected(False))
                return
            failure = failures.connack_failure(self.url, code, str(reason_code))
            self._report_failure(self.attempts.refused(failure))
            return
        self.attempts.succeeded()
        self._broker_max_packet = getattr(properties, "MaximumPacketSize", None)
        session_present = bool(flags.session_present)
        with self._sub_lock:
            self._connected = True
            self._sub_mids.clear()
            todo = list(self._subs) if not session_present else sorted(self._unsent)
            self._send_subscriptions(todo)
        self._emit(Connected(session_present))

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any, properties: Any
    ) -> None:
        with self._sub_lock:
            was_connected = self._connected
            self._connected = False
        if self._stopping.is_set():
            self.attempts.pending = False
            self._emit(Disconnected("stopped"))
        elif self.attempts.pending:  # the attempt ended before any CONNACK
            self._attempt_failed(None)
        elif was_connected:
            self._emit(Disconnected(self._disconnect_reason(reason_code)))
        self.attempts.last_socket_error = None

    def _disconnect_reason(self, reason_code: Any) -> str:
        error = self.attempts.last_socket_error
        detail = f" ({getattr(error, 'reason', None) or error})" if error is not None else ""
        return f"connection lost: {reason_code}{detail}"

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._emit(MessageReceived(message.topic, bytes(message.payload), bool(message.retain),
                                   time.time()))

    def _remember_topic(self, mid: int, topic: str) -> None:
        """After paho queued a publish: its PUBACK may already have been handled
        (then its code is in ``_early_acks``). Each packet id's topic is taken exactly once,
        so a reused packet id never reports an older message's topic."""
        with self._acks:
            early = self._early_acks.pop(mid, None)
            if early is None:
                self._mid_topics[mid] = topic
        if early is not None and early >= 0x80:  # rare: reported from the publishing thread
            self._denied(topic, early)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        code = int(reason_code.value)
        with self._acks:
            self._ack_codes[mid] = code
            self._ack_codes.move_to_end(mid)
            while len(self._ack_codes) > _ACKS_KEPT:
                self._ack_codes.popitem(last=False)
            topic = self._mid_topics.pop(mid, None)
            if topic is None:
                self._early_acks[mid] = code
                while len(self._early_acks) > _ACKS_KEPT:
                    self._early_acks.popitem(last=False)
            self._acks.notify_all()
        if self._report_acks:
            self._emit(PublishAcknowledged(mid, code))
        if topic is not None and code >= 0x80:
            self._denied(topic, code)

    def _denied(self, topic: str, code: int) -> None:
        event = PublishDenied(topic, code)
        log.warning("%s: the broker refused our publish on %s: %s (%d)",
                    self.client_id, topic, event.reason, code)
        self._emit(event)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        with self._acks:
            self._suback_codes[mid] = int(reason_codes[0].value) if reason_codes else 0x80
            while len(self._suback_codes) > _ACKS_KEPT:
                self._suback_codes.popitem(last=False)
            self._acks.notify_all()
        with self._sub_lock:
            topic_filter = self._sub_mids.pop(mid, None)
            refused = [rc for rc in reason_codes if rc.is_failure]
            if topic_filter is None or not refused:
                return
            # Do not retry a refused filter after every reconnect.
            self._subs.pop(topic_filter, None)
        log.warning("%s: subscription %r refused: %s", self.client_id, topic_filter, refused[0])
        self._emit(SubscriptionRefused(topic_filter, int(refused[0].value)))
