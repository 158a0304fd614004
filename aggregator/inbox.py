"""The aggregator's inbound event queue, bounded by the payload bytes it holds.

The transport's network thread puts events, the service loop takes them. An unbounded
queue lets any sender who publishes faster than the loop decodes, verifies and refuses
(a flood of near-limit messages, say) grow the aggregator's memory by the size of the
backlog. Here ``put`` blocks while the held payloads would exceed ``max_bytes``: the
network thread stops reading the socket, TCP pushes back, and the broker holds the backlog
under its own limits (``max_queued_messages``). One event is always admitted into an empty
queue, so a single message as large as the codec allows never deadlocks. The loop never
waits for the network thread (the aggregator publishes without waiting for acks), so a
blocked ``put`` ends when the loop takes the next event, or at ``close`` (the service
stopping: what still arrives is dropped, as events queued after the loop's end always were).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from fedcore.transport.base import MessageReceived, TransportEvent


def _size(event: TransportEvent) -> int:
    return len(event.payload) if isinstance(event, MessageReceived) else 0


class Inbox:
    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be >= 1")
        self.max_bytes = max_bytes
        self.held_bytes = 0
        self.peak_bytes = 0  # the most payload bytes ever held at once
        self._events: deque[TransportEvent] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, event: TransportEvent) -> None:
        size = _size(event)
        with self._cond:
            self._cond.wait_for(lambda: self._closed or not self._events
                                or self.held_bytes + size <= self.max_bytes)
            if self._closed:
                return
            self._events.append(event)
            self.held_bytes += size
            self.peak_bytes = max(self.peak_bytes, self.held_bytes)
            self._cond.notify_all()

    def get(self, timeout: float) -> TransportEvent | None:
        """The oldest event, or None when none came within ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self._events:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)
            event = self._events.popleft()
            self.held_bytes -= _size(event)
            self._cond.notify_all()
            return event

    def close(self) -> None:
        """Release a blocked ``put`` (the loop has stopped taking events)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def __len__(self) -> int:
        with self._cond:
            return len(self._events)
