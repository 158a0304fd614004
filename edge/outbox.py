"""What the gateway publishes goes through here: spooled to disk until the broker has it.

Theory of operation
-------------------
``publish`` writes a signed message to the :class:`~edge.spool.Spool` (fsync'd) and hands
it to the transport while the gateway is connected. The transport reports each PUBACK as a
:class:`~fedcore.transport.base.PublishAcknowledged` with the packet id that ``publish``
returned; only then does the entry leave the spool. So an update made while the broker is
unreachable, or in flight when the gateway is killed or loses power, is sent after the
next start.

- **Connected**: first the newest "latest only" messages (the retained status), then every
  spooled entry not yet handed to the transport, oldest first. Entries handed over before
  a connection dropped stay with the transport: paho keeps an unacknowledged QoS 1 message
  and resends it, with the same packet id, after reconnecting, so they are not sent twice.
- **Disconnected**: new entries are spooled, not handed over; the transport's memory holds
  only what was in flight, and the spool's bounds are the gateway's bound.
- **Latest only** (``publish_latest``): the retained status says what the gateway does
  *now*; an older one is worth nothing once a newer exists, and a restarted gateway
  publishes a fresh one. While offline the newest per topic waits in memory; it is not
  spooled.
- **Same message twice**: a resend (the participant re-sends its cached update when a
  round is re-announced) whose (topic, message id) is still spooled is not spooled again:
  the spooled copy is on its way.
- **Trouble is counted, never fatal**: an entry dropped for room (``full``), refused by the
  broker (``refused``, PUBACK >= 0x80), larger than the broker takes or the spool holds
  (``too_large``) or found torn after a power cut (``torn``) is logged and counted in
  ``fedgate_edge_spool_dropped{reason}``. A disk that refuses the write (``disk_error``)
  leaves the message in the transport's memory only, as before the spool existed.

Without a spool (``spool=None``, for transports that do not report acknowledgements) it
hands every message to the transport at once.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from edge.spool import ACKNOWLEDGED, Entry, Spool
from fedcore.errors import TransportError
from fedcore.transport.base import PayloadTooLargeError, PublishAcknowledged, Transport

if TYPE_CHECKING:
    from edge.metrics import EdgeMetrics

log = logging.getLogger("fedgate.edge")


class Outbox:
    def __init__(self, transport: Transport, spool: Spool | None,
                 metrics: EdgeMetrics | None = None) -> None:
        self.transport = transport
        self.spool = spool
        self.metrics = metrics
        self.connected = False
        self._in_flight: dict[int, int] = {}  # packet id -> spool sequence number
        self._handed: set[int] = set()  # sequence numbers the transport holds
        self._latest: dict[str, tuple[bytes, int, bool]] = {}  # topic -> newest payload, qos, retain
        self._disk_failing = False
        if spool is not None and metrics is not None:
            for reason, count in spool.dropped.items():  # found while loading
                metrics.spool_dropped.inc(count, reason=reason)
        self._gauges()

    # ---- what the runtime calls

    def publish(self, topic: str, payload: bytes, *, kind: str, round: int, message_id: str,
                qos: int = 1, retain: bool = False, resend: bool = False) -> None:
        """Spool and (when connected) send a signed message. ``resend``: the caller sends a
        message again under its old message id; if that one is still spooled, it is on its
        way and this copy is dropped. (Without ``resend`` nothing is compared: several
        messages may share a message id, e.g. the parts of one large message.)"""
        if self.spool is None:
            self.transport.publish(topic, payload, qos=qos, retain=retain)
            return
        if resend and self.spool.find(topic, message_id) is not None:
            log.debug("message %s is spooled already; not spooled twice", message_id)
            return
        try:
            entry, dropped = self.spool.add(topic, payload, qos, retain, kind, round, message_id)
        except OSError as exc:
            self._disk_error(exc)
            self.transport.publish(topic, payload, qos=qos, retain=retain)  # memory only
            return
        if self._disk_failing:
            log.info("spool %s is written again", self.spool.path)
            self._disk_failing = False
        for old in dropped:
            self._dropped(old, "full")
        if entry is None:
            log.warning("%s of round %d (%d bytes) is larger than [spool] max_bytes = %d: "
                        "sent without spooling", kind, round, len(payload), self.spool.max_bytes)
            self._count("too_large")
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        elif self.connected:
            self._send(entry)
        self._gauges()

    def publish_latest(self, topic: str, payload: bytes, qos: int = 1, retain: bool = True) -> None:
        """Send now, or keep only the newest per topic until connected."""
        if self.connected or self.spool is None:
            self._latest.pop(topic, None)
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        else:
            self._latest[topic] = (payload, qos, retain)

    def on_connected(self) -> None:
        self.connected = True
        latest, self._latest = self._latest, {}
        for topic, (payload, qos, retain) in latest.items():
            self.transport.publish(topic, payload, qos=qos, retain=retain)
        if self.spool is None:
            return
        waiting = [e for e in self.spool if e.seq not in self._handed]
        if waiting:
            log.info("sending spooled messages: %d, %d bytes", len(waiting),
                     sum(len(e.payload) for e in waiting))
        for entry in waiting:
            self._send(entry)
        self._gauges()

    def on_disconnected(self) -> None:
        self.connected = False

    def on_acknowledged(self, event: PublishAcknowledged) -> None:
        seq = self._in_flight.pop(event.mid, None)
        if seq is None or self.spool is None:
            return  # not ours (the status), or already dropped
        self._handed.discard(seq)
        if event.refused:
            entry = self.spool.remove(seq, "refused")
            if entry is not None:
                log.warning("the broker refused %s of round %d (reason code %d): dropped from "
                            "the spool", entry.kind, entry.round, event.reason_code)
                self._count("refused")
        else:
            self.spool.remove(seq, ACKNOWLEDGED)
        self._gauges()

    def close(self) -> None:
        if self.spool is not None:
            self.spool.close()

    # ---- inside

    def _send(self, entry: Entry) -> None:
        assert self.spool is not None
        try:
            result = self.transport.publish(entry.topic, entry.payload, qos=entry.qos,
                                            retain=entry.retain)
        except PayloadTooLargeError as exc:  # the broker's limit: no resend can pass it
            log.error("%s of round %d cannot be sent: %s; dropped from the spool", entry.kind,
                      entry.round, exc)
            self.spool.remove(entry.seq, "too_large")
            self._count("too_large")
            return
        except TransportError as exc:  # stays spooled: sent at the next connect
            log.warning("%s of round %d not handed to the transport: %s", entry.kind,
                        entry.round, exc)
            return
        if entry.qos == 0:
            self.spool.remove(entry.seq, ACKNOWLEDGED)  # no PUBACK will come
            return
        self._in_flight[result.mid] = entry.seq
        self._handed.add(entry.seq)

    def _dropped(self, entry: Entry, reason: str) -> None:
        log.warning("spool full ([spool] max_entries / max_bytes): dropped the oldest message, "
                    "%s of round %d (id %s)", entry.kind, entry.round, entry.message_id)
        self._handed.discard(entry.seq)
        for mid, seq in list(self._in_flight.items()):
            if seq == entry.seq:
                del self._in_flight[mid]
        self._count(reason)

    def _disk_error(self, exc: OSError) -> None:
        assert self.spool is not None
        if not self._disk_failing:
            log.error("cannot write the spool %s: %s; messages are kept in memory only until "
                      "it works again", self.spool.path, exc.strerror or exc)
            self._disk_failing = True
        self.spool.dropped["disk_error"] += 1
        self._count("disk_error")

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.spool_dropped.inc(reason=reason)

    def _gauges(self) -> None:
        if self.metrics is not None and self.spool is not None:
            self.metrics.spool_entries.set(len(self.spool))
            self.metrics.spool_bytes.set(self.spool.live_bytes)
