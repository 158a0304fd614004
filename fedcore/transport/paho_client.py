"""paho's client, adapted: socket hooks and the bookkeeping of connection attempts.

:class:`HookedClient` overrides private hooks that exist throughout paho 2.x (pinned <3):
``_create_socket_connection`` (TCP_NODELAY on the TCP socket, under any TLS layer),
``_create_socket`` (an attempt starts; its exception is captured before paho's loop
swallows it), ``_sock_send`` / ``_sock_recv`` (byte counters; read and write errors, which
carry the broker's TLS alert when it refuses our certificate), ``_check_keepalive`` (a
CONNACK that does not come within the connect timeout ends the attempt) and
``_reconnect_wait`` (our jittered backoff).

:class:`Attempts` remembers the attempt in progress and turns its end into one
:class:`~fedcore.transport.base.ConnectFailed`, drawing the delay before the next attempt
at that moment so the event can say when it will be. Everything here runs on paho's
network thread.
"""

from __future__ import annotations

import logging
import random
import socket
import time
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fedcore.transport import failures
from fedcore.transport.base import Backoff, BrokerUrl, ConnectFailed, TlsSettings

log = logging.getLogger(__name__)


def set_tcp_nodelay(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # not a TCP socket (a proxy wrapper): nothing to tune
        log.debug("TCP_NODELAY not set: %s", exc)


class _NoConnack(Exception):
    """Marker: the attempt timed out waiting for the CONNACK."""


class Attempts:
    """The connection attempt in progress and the reconnect backoff."""

    def __init__(
        self, url: BrokerUrl, tls: TlsSettings | None, connect_timeout: float, backoff: Backoff,
        rng: random.Random,
    ) -> None:
        self.url = url
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.backoff = backoff
        self.rng = rng
        self.count = 0  # failed attempts since the last CONNACK success
        self.pending = False
        self._socket_ready_at: float | None = None
        self._error: BaseException | None = None
        self._next_delay: float | None = None
        self.last_socket_error: BaseException | None = None

    def started(self) -> None:
        self.pending = True
        self._socket_ready_at = None
        self._error = None

    def socket_ready(self) -> None:
        self._socket_ready_at = time.monotonic()

    def socket_error(self, exc: BaseException) -> None:
        self.last_socket_error = exc
        if self.pending and self._error is None:
            self._error = exc

    def connack_overdue(self) -> bool:
        ready = self._socket_ready_at
        if not self.pending or ready is None or time.monotonic() - ready < self.connect_timeout:
            return False
        self._error = _NoConnack()
        return True

    def succeeded(self) -> None:
        self.pending = False
        self.count = 0
        self.last_socket_error = None

    def failed(self, exc: BaseException | None = None) -> ConnectFailed:
        """The attempt ended without a CONNACK: ``exc`` or the error seen during it."""
        exc = exc if exc is not None else self._error
        if exc is None:
            event = failures.closed_before_connack(self.url)
        elif isinstance(exc, _NoConnack):
            event = failures.no_connack(self.url, self.connect_timeout)
        else:
            event = failures.socket_failure(self.url, exc, self.tls, self.connect_timeout)
        return self.refused(event)

    def refused(self, event: ConnectFailed) -> ConnectFailed:
        """End the attempt with ``event``, adding the delay before the next one."""
        self.pending = False
        self._next_delay = self._draw()
        return ConnectFailed(event.url, event.reason, event.permanent, event.not_authorized,
                             round(self._next_delay, 3))

    def take_delay(self) -> tuple[float, bool]:
        """The wait before the next attempt, and whether it was already announced."""
        delay, self._next_delay = self._next_delay, None
        if delay is not None:
            return delay, True
        return self._draw(), False  # a lost connection: no failed attempt drew it

    def _draw(self) -> float:
        delay = self.backoff.delay(self.count, self.rng)
        self.count += 1
        return delay


class Owner(Protocol):
    """What :class:`HookedClient` calls back into (the transport)."""

    attempts: Attempts

    def _count(self, sent: int = 0, received: int = 0) -> None: ...
    def _attempt_failed(self, exc: BaseException | None) -> None: ...
    def _wait_before_reconnect(self) -> None: ...


class HookedClient(mqtt.Client):
    """paho's MQTT v5 client with the hooks described in the module docstring."""

    def __init__(self, owner: Owner, client_id: str) -> None:
        super().__init__(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self._owner = owner

    def _create_socket_connection(self) -> socket.socket:
        sock = super()._create_socket_connection()
        set_tcp_nodelay(sock)  # the TCP socket, before any TLS wrapping
        return sock

    def _create_socket(self) -> Any:
        self._owner.attempts.started()
        try:
            sock = super()._create_socket()
        except OSError as exc:  # paho's loop swallows it: report it first
            self._owner._attempt_failed(exc)
            raise
        self._owner.attempts.socket_ready()
        return sock

    def _sock_send(self, buf: bytes | bytearray) -> int:
        try:
            sent = super()._sock_send(buf)
        except BlockingIOError:
            raise
        except OSError as exc:
            self._owner.attempts.socket_error(exc)
            raise
        self._owner._count(sent=sent)
        return sent

    def _sock_recv(self, bufsize: int) -> bytes:
        try:
            data = super()._sock_recv(bufsize)
        except BlockingIOError:
            raise
        except OSError as exc:
            self._owner.attempts.socket_error(exc)
            raise
        self._owner._count(received=len(data))
        return data

    def _check_keepalive(self) -> None:
        if self._sock is not None and self._owner.attempts.connack_overdue():
            self._sock_close()  # as paho does for a missed keepalive
            self._do_on_disconnect(packet_from_broker=False, v1_rc=MQTTErrorCode.MQTT_ERR_KEEPALIVE)
            return
        super()._check_keepalive()

    def _reconnect_wait(self) -> None:
        self._owner._wait_before_reconnect()
