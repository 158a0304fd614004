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
  ``reconnect_delay_set`` has no jitter, so :class:`_Client` overrides paho's
  ``_reconnect_wait`` hook with :class:`~fedcore.transport.base.Backoff` (capped,
  exponential, jittered with the injected ``rng``) that ``stop()`` can interrupt. QoS 1
  messages published while offline stay in paho's queue and are sent after reconnecting.
- **PUBACK reason codes** arrive in ``on_publish``; a publish with ``wait`` blocks on a
  condition until its packet id shows up (the last acks are kept in a small bounded map
  so a PUBACK that overtakes the waiter is not lost).
- **Byte counters** count every MQTT byte written to / read from the connection (all
  packet types: CONNECT, PUBLISH, acks, pings), after TLS decryption; TLS records and
  TCP/IP headers are not counted. ``_Client`` overrides paho's ``_sock_send`` /
  ``_sock_recv`` hooks for this; both private hooks exist throughout paho 2.x (pinned <3).
- **Size check.** paho does not check the broker's Maximum Packet Size (an oversized QoS 1
  message loops through reconnects), so ``publish`` checks it first.
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from fedcore.errors import LocalProtocolError, TransportError
from fedcore.transport.base import (
    Backoff,
    BrokerUrl,
    Connected,
    Disconnected,
    MessageReceived,
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

log = logging.getLogger(__name__)

DEFAULT_MAX_PAYLOAD = 8 * 1024 * 1024
_ACKS_KEPT = 1024


class _Client(mqtt.Client):
    """paho's client with byte counting and our jittered reconnect wait."""

    def __init__(self, owner: PahoTransport, client_id: str) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._owner = owner

    def _sock_send(self, buf: bytes | bytearray) -> int:
        sent = super()._sock_send(buf)
        self._owner._count(sent=sent)
        return sent

    def _sock_recv(self, bufsize: int) -> bytes:
        data = super()._sock_recv(bufsize)
        self._owner._count(received=len(data))
        return data

    def _reconnect_wait(self) -> None:
        self._owner._wait_before_reconnect()


class PahoTransport:
    """A :class:`~fedcore.transport.base.Transport` over a real MQTT v5 broker."""

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
        rng: random.Random,
    ) -> None:
        self.url = url if isinstance(url, BrokerUrl) else BrokerUrl.parse(url)
        if tls is not None and not self.url.tls:
            raise LocalProtocolError(f"TLS settings given for the plain url {self.url}")
        if max_payload <= 0 or session_expiry < 0 or keepalive <= 0:
            raise LocalProtocolError("max_payload and keepalive must be > 0, session_expiry >= 0")
        self.client_id = client_id
        self._clean_start = clean_start
        self._session_expiry = session_expiry
        self._keepalive = keepalive
        self._max_payload = max_payload
        self._backoff = Backoff(backoff_min, backoff_max)
        self._rng = rng
        self._attempt = 0
        self._stopping = threading.Event()
        self._on_event: Callable[[TransportEvent], None] | None = None
        self._broker_max_packet: int | None = None

        self._counter_lock = threading.Lock()
        self._sent = 0
        self._received = 0

        # Subscriptions: filter -> qos; `_unsent` were added while offline.
        self._sub_lock = threading.Lock()
        self._connected = False
        self._subs: dict[str, int] = {}
        self._unsent: set[str] = set()
        self._sub_mids: dict[int, str] = {}

        self._acks = threading.Condition()
        self._ack_codes: OrderedDict[int, int] = OrderedDict()

        self._client = _Client(self, client_id)
        if self.url.tls:
            self._configure_tls(tls or TlsSettings())
        if will is not None:
            check_qos(will.qos)
            self._client.will_set(will.topic, will.payload, will.qos, will.retain)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_subscribe = self._on_subscribe

    def _configure_tls(self, tls: TlsSettings) -> None:
        self._client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
            tls_version=ssl.PROTOCOL_TLS_CLIENT,
        )

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

    def stop(self) -> None:
        self._stopping.set()
        self._client.disconnect()  # DISCONNECT reason 0: the broker discards the will
        self._client.loop_stop()
        with self._sub_lock:
            self._connected = False

    # ------------------------------------------------------------------ paho thread

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

    def _wait_before_reconnect(self) -> None:
        delay = self._backoff.delay(self._attempt, self._rng)
        self._attempt += 1
        log.debug("%s: reconnecting in %.2f s", self.client_id, delay)
        self._stopping.wait(delay)

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
            log.warning("%s: broker refused connection: %s", self.client_id, reason_code)
            return
        self._attempt = 0
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
        if was_connected or self._stopping.is_set():
            reason = "stopped" if self._stopping.is_set() else f"connection lost: {reason_code}"
            self._emit(Disconnected(reason))

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._emit(MessageReceived(message.topic, bytes(message.payload), bool(message.retain)))

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any, properties: Any
    ) -> None:
        with self._acks:
            self._ack_codes[mid] = int(reason_code.value)
            self._ack_codes.move_to_end(mid)
            while len(self._ack_codes) > _ACKS_KEPT:
                self._ack_codes.popitem(last=False)
            self._acks.notify_all()

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: Any, properties: Any
    ) -> None:
        with self._sub_lock:
            topic_filter = self._sub_mids.pop(mid, None)
            refused = [rc for rc in reason_codes if rc.is_failure]
            if topic_filter is None or not refused:
                return
            # Do not retry a refused filter after every reconnect.
            self._subs.pop(topic_filter, None)
        log.warning("%s: subscription %r refused: %s", self.client_id, topic_filter, refused[0])
        self._emit(SubscriptionRefused(topic_filter, int(refused[0].value)))
