"""A TCP proxy whose link can be partitioned and healed, for fault benchmarks.

Theory of operation
-------------------
The proxy listens on 127.0.0.1 and pumps bytes unchanged between each accepted connection
and one connection it opens to the upstream broker (TLS passes through untouched: the
proxy never reads the bytes). Put it in front of the broker for one client (its config's
``[broker] url`` names the proxy's port) and that client's link can be cut.

:meth:`PartitionProxy.partition` cuts the link *silently*, as a failed switch or a cable
pulled between two routers does: nothing is closed and nothing is refused, the pumps simply
stop moving bytes in both directions (what was in flight waits in the proxy and the
kernels' buffers, as TCP retransmissions would hold it), and a connection accepted during
the partition is not connected upstream until it heals. Neither end learns of the cut from
the network; each must notice through its own keepalive. :meth:`heal` lets the bytes flow
again: connections that both ends still hold resume where they stopped; one that an end
closed meanwhile is closed on the other side too.

The proxy runs its own asyncio loop in a daemon thread, so a synchronous benchmark can use
it. Usage: ``proxy = PartitionProxy(broker_port).start(); ...; proxy.partition(); ...;
proxy.heal(); proxy.stop()``.
"""

from __future__ import annotations

import asyncio
import threading

from counting_proxy import LoopThreadServer


class PartitionProxy(LoopThreadServer):
    THREAD_NAME = "partition-proxy"

    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1",
                 listen_port: int = 0) -> None:
        super().__init__(listen_port)
        self.upstream = (upstream_host, upstream_port)
        self.accepted = 0  # connections accepted so far (a reconnect shows up here)
        self._lock = threading.Lock()
        self._open: asyncio.Event | None = None

    def _on_loop(self) -> None:
        self._open = asyncio.Event()  # open: bytes flow
        self._open.set()

    @property
    def partitioned(self) -> bool:
        return self._open is not None and not self._open.is_set()

    def partition(self) -> None:
        """Stop moving bytes, both ways, on every connection (new ones too)."""
        self._gate(False)

    def heal(self) -> None:
        self._gate(True)

    def _gate(self, is_open: bool) -> None:
        loop, gate = self._loop, self._open
        if loop is None or gate is None:
            raise RuntimeError("the proxy is not running")
        # asyncio.Event is not thread-safe: flip it on the proxy's own loop, and wait
        done = threading.Event()

        def flip() -> None:
            gate.set() if is_open else gate.clear()
            done.set()

        loop.call_soon_threadsafe(flip)
        done.wait(10)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        with self._lock:
            self.accepted += 1
        up_writer: asyncio.StreamWriter | None = None
        try:
            await self._open.wait()  # a connection made during a partition hangs here
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            tasks = [asyncio.ensure_future(self._pump(reader, up_writer)),
                     asyncio.ensure_future(self._pump(up_reader, writer))]
            try:
                # when either side closes, close both: MQTT has no half-open use
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
        except OSError:
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._open is not None
        while True:
            await self._open.wait()
            data = await reader.read(65536)
            if not data:
                return
            # bytes read just as the partition began are held, not dropped: TCP would
            # deliver them late, never lose them
            await self._open.wait()
            writer.write(data)
            await writer.drain()
