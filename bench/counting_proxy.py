"""A byte-counting TCP proxy for MQTT, for measuring what really crosses the wire.

Theory of operation
-------------------
The proxy listens on 127.0.0.1 and, for every accepted connection, opens one connection
to the upstream broker and pumps bytes both ways unchanged. Each connection gets a
:class:`ConnStats`: bytes client -> broker (``up``) and broker -> client (``down``), i.e.
whole MQTT packets with their fixed headers, properties, acks, pings and the CONNECT /
DISCONNECT exchange - everything but the TCP/IP headers.

Both directions also go through a small incremental MQTT framer (fixed header + remaining
length; for PUBLISH also the topic name) that never changes the bytes. It gives:

- the client id, parsed from the CONNECT packet, so bytes can be summed per client even
  across reconnects;
- packet counts per type and direction (so a test can see PINGREQ/PUBACK were counted);
- a *mark* each time the client finishes sending a PUBLISH: ``(topic, up, down)``, the
  counters at that moment. A gateway publishes exactly one update per round, so the
  difference between two consecutive update marks is exactly one round of that client's
  traffic (the model and announcement it downloaded, its acks and pings, its update),
  with no race against other clients or the observer's clock.

The proxy runs its own asyncio loop in a daemon thread (:meth:`CountingProxy.start`) so a
synchronous benchmark can use it; counters are read under a lock.

Usage: ``proxy = CountingProxy(broker_port).start(); url = proxy.url; ...; proxy.stop()``.
"""

from __future__ import annotations

import asyncio
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Self

PACKET_TYPES = {
    1: "CONNECT", 2: "CONNACK", 3: "PUBLISH", 4: "PUBACK", 5: "PUBREC", 6: "PUBREL",
    7: "PUBCOMP", 8: "SUBSCRIBE", 9: "SUBACK", 10: "UNSUBSCRIBE", 11: "UNSUBACK",
    12: "PINGREQ", 13: "PINGRESP", 14: "DISCONNECT", 15: "AUTH",
}
_CONNECT_CAP = 65536  # a CONNECT (with its will) is kept whole to read the client id


@dataclass(frozen=True)
class Packet:
    kind: str
    size: int  # whole packet, fixed header included
    end: int  # offset just past the packet in the chunk that completed it
    topic: str = ""  # PUBLISH only
    raw: bytes = b""  # CONNECT only


class MqttFramer:
    """Splits one direction of an MQTT byte stream into packets, chunk by chunk."""

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self._head = bytearray()  # bytes of the current packet seen so far (header part)
        self._total = 0  # size of the current packet once its fixed header is known
        self._seen = 0  # bytes of the current packet consumed so far
        self._kind = 0
        self._topic = ""
        self._need = 0  # header bytes still wanted before the body can be skipped
        self._offset = 0  # where the variable header starts (after the remaining length)

    def feed(self, data: bytes) -> list[Packet]:
        out: list[Packet] = []
        i, n = 0, len(data)
        while i < n:
            if self._total == 0 or self._seen < self._need:
                # header bytes one at a time: they are few, the bodies are skipped in bulk
                self._head.append(data[i])
                i += 1
                self._seen += 1
                self._parse_head()
            else:
                take = min(self._total - self._seen, n - i)
                if self._kind == 1 and len(self._head) < _CONNECT_CAP:
                    self._head += data[i:i + take]
                i += take
                self._seen += take
            if self._total and self._seen == self._total and self._seen >= self._need:
                raw = bytes(self._head) if self._kind == 1 else b""
                out.append(Packet(PACKET_TYPES.get(self._kind, f"type{self._kind}"),
                                  self._total, i, self._topic, raw))
                self._reset()
        return out

    def _parse_head(self) -> None:
        head = self._head
        if self._total == 0:
            parsed = _varint(head, 1)
            if parsed is None:
                return
            remaining, offset = parsed
            self._kind = head[0] >> 4
            self._total = offset + remaining
            self._need = offset + 2 if self._kind == 3 and remaining >= 2 else offset
            self._offset = offset
            return
        if self._kind == 3 and not self._topic and len(head) >= self._need:
            tlen = int.from_bytes(head[self._offset:self._offset + 2], "big")
            if self._need == self._offset + 2:
                self._need = min(self._total, self._offset + 2 + tlen)
            if len(head) >= self._need:
                self._topic = bytes(head[self._offset + 2:self._need]).decode("utf-8", "replace")


def _varint(buf: bytes | bytearray, start: int) -> tuple[int, int] | None:
    """(value, offset after it) of an MQTT variable byte integer, or None if incomplete."""
    value, shift, i = 0, 0, start
    while i < len(buf):
        byte = buf[i]
        value += (byte & 0x7F) << shift
        i += 1
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise ValueError("malformed MQTT remaining length")
    return None


def connect_client_id(packet: bytes) -> str:
    """The client id in a whole CONNECT packet (MQTT 3.1, 3.1.1 or 5), '' if unreadable."""
    try:
        parsed = _varint(packet, 1)
        if parsed is None:
            return ""
        i = parsed[1]
        name_len = int.from_bytes(packet[i:i + 2], "big")
        i += 2 + name_len
        level = packet[i]
        i += 1 + 1 + 2  # level, flags, keep-alive
        if level == 5:
            props = _varint(packet, i)
            if props is None:
                return ""
            i = props[1] + props[0]
        id_len = int.from_bytes(packet[i:i + 2], "big")
        return packet[i + 2:i + 2 + id_len].decode("utf-8", "replace")
    except (IndexError, ValueError):
        return ""


class LoopThreadServer:
    """A TCP server on 127.0.0.1 running its own asyncio loop in a daemon thread, so that a
    synchronous benchmark can use it: ``start()`` returns once it listens (``port`` is then
    the real one), ``stop()`` closes it and cancels every connection. Subclasses give
    ``_accept`` and may prepare loop-bound state in ``_on_loop``."""

    THREAD_NAME = "proxy"
    BACKLOG = 128

    def __init__(self, listen_port: int = 0) -> None:
        self.port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    def _on_loop(self) -> None:
        """Runs on the server's loop, before it listens."""

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._on_loop()
                self._server = loop.run_until_complete(
                    asyncio.start_server(self._accept, "127.0.0.1", self.port, backlog=self.BACKLOG))
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=main, name=self.THREAD_NAME, daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None or self._thread is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = None


@dataclass
class ConnStats:
    index: int
    client_id: str = ""
    up: int = 0
    down: int = 0
    packets_up: Counter[str] = field(default_factory=Counter)
    packets_down: Counter[str] = field(default_factory=Counter)
    marks: list[tuple[str, int, int]] = field(default_factory=list)  # (topic, up, down)
    closed: bool = False


class CountingProxy(LoopThreadServer):
    THREAD_NAME = "counting-proxy"
    BACKLOG = 1024

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        super().__init__(listen_port)
        self.upstream = (upstream_host, upstream_port)
        self._lock = threading.Lock()
        self._conns: list[ConnStats] = []

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def connections(self) -> list[ConnStats]:
        """A copy of every connection's counters so far."""
        with self._lock:
            return [ConnStats(c.index, c.client_id, c.up, c.down, Counter(c.packets_up),
                              Counter(c.packets_down), list(c.marks), c.closed)
                    for c in self._conns]

    def by_client(self) -> dict[str, tuple[int, int]]:
        """(up, down) bytes summed per client id over all its connections."""
        totals: dict[str, tuple[int, int]] = {}
        for c in self.connections():
            up, down = totals.get(c.client_id, (0, 0))
            totals[c.client_id] = (up + c.up, down + c.down)
        return totals

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self._lock:
            stats = ConnStats(len(self._conns))
            self._conns.append(stats)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.close()
            with self._lock:
                stats.closed = True
            return
        tasks = [asyncio.ensure_future(self._pump(reader, up_writer, stats, upward=True)),
                 asyncio.ensure_future(self._pump(up_reader, writer, stats, upward=False))]
        try:
            # when either side closes, close both: MQTT has no half-open use
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for w in (writer, up_writer):
                w.close()
            with self._lock:
                stats.closed = True

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    stats: ConnStats, *, upward: bool) -> None:
        framer = MqttFramer()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            packets = framer.feed(data)
            with self._lock:
                before = stats.up if upward else stats.down
                for p in packets:
                    (stats.packets_up if upward else stats.packets_down)[p.kind] += 1
                    if upward and p.kind == "CONNECT" and not stats.client_id:
                        stats.client_id = connect_client_id(p.raw)
                    if upward and p.kind == "PUBLISH":
                        stats.marks.append((p.topic, before + p.end, stats.down))
                if upward:
                    stats.up += len(data)
                else:
                    stats.down += len(data)
            writer.write(data)
            await writer.drain()
