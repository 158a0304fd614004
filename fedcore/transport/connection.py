"""What a service does about its broker connection: what to log, when to give up, and with
which exit code.

Theory of operation
-------------------
The runtime feeds every transport event into :meth:`ConnectionWatch.handle` with the
current time, and calls :meth:`ConnectionWatch.check` when its queue is idle. Both return
a :class:`Verdict` (one log line and, when the service must stop, an exit code) or None.
The watch is pure: no clock, no logging, no I/O.

Rules, in this order of precedence:

1. **Giving up is final.** After a verdict with an exit code, nothing else is said.
2. **The broker refusing our own topics stops the service, at any time (exit 77).** A
   PUBACK or SUBACK with reason code 135 (not authorized) on a topic the service needs
   (``own_topics``: its status and update topics, the round and model it subscribes to)
   fails the same way on every message: the broker's ACL grants each client the topics
   named after the CN of its certificate, so the configured id differs from the name in
   the certificate (or the ACL was not generated for this fleet). Other denials are logged.
3. **Before the first connection** (state ``STARTING``): a transient failure is logged
   with the URL, the reason and the next retry; a permanent one gives up at once, with 77
   when the broker refused *us* (our certificate, CONNACK not authorized) and 78 when our
   configuration is wrong (``ca_file``, host name, no client certificate); no connection
   within ``startup_timeout_s`` gives up with 69.
4. **After the first connection** (``CONNECTED`` / ``RECONNECTING``) losses and failed
   reconnects, permanent ones included, are logged and retried forever: a broker restart,
   a re-signed CRL or a repaired network must bring the service back without anyone
   restarting it.

Exit codes (``fedcore.errors.EXIT_CODES``): 69 broker unavailable, 77 not authorized by
the broker, 78 configuration error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum

from fedcore.errors import ConfigError, NotAuthorizedError, TransportError
from fedcore.transport.base import (
    REASON_NAMES,
    REASON_NOT_AUTHORIZED,
    Connected,
    ConnectFailed,
    Disconnected,
    PublishDenied,
    SubscriptionRefused,
    TransportEvent,
    topic_matches,
)

EXIT_UNAVAILABLE = TransportError.exit_code  # 69
EXIT_NOT_AUTHORIZED = NotAuthorizedError.exit_code  # 77
EXIT_CONFIG = ConfigError.exit_code  # 78

GIVING_UP = "; giving up: "  # every verdict with an exit code ends with this and the code's meaning
_GIVING_UP = {
    EXIT_UNAVAILABLE: "exit 69 (broker unavailable)",
    EXIT_NOT_AUTHORIZED: "exit 77 (not authorized by the broker)",
    EXIT_CONFIG: "exit 78 (configuration error; a restart cannot fix it)",
}


@dataclass(frozen=True, slots=True)
class Verdict:
    """Log ``message`` at ``level`` (a :mod:`logging` level); when ``exit_code`` is set,
    stop the service and exit with it."""

    level: int
    message: str
    exit_code: int | None = None


class State(Enum):
    STARTING = "starting"  # not connected yet since the service started
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"  # connected before, not now
    GAVE_UP = "gave up"


class Input(Enum):
    CONNECTED = "connected"
    LOST = "lost"
    FAILED = "failed"
    FAILED_PERMANENTLY = "failed permanently"
    DENIED_OWN = "denied on an own topic"
    DENIED = "denied"
    DEADLINE = "startup deadline passed"


# (state, input) -> next state. Pairs not listed leave the state as it is.
_NEXT: dict[tuple[State, Input], State] = {
    (State.STARTING, Input.CONNECTED): State.CONNECTED,
    (State.STARTING, Input.FAILED_PERMANENTLY): State.GAVE_UP,
    (State.STARTING, Input.DEADLINE): State.GAVE_UP,
    (State.STARTING, Input.DENIED_OWN): State.GAVE_UP,
    (State.CONNECTED, Input.LOST): State.RECONNECTING,
    (State.CONNECTED, Input.FAILED): State.RECONNECTING,
    (State.CONNECTED, Input.FAILED_PERMANENTLY): State.RECONNECTING,
    (State.CONNECTED, Input.DENIED_OWN): State.GAVE_UP,
    (State.RECONNECTING, Input.CONNECTED): State.CONNECTED,
    (State.RECONNECTING, Input.DENIED_OWN): State.GAVE_UP,
}


class ConnectionWatch:
    """Judges one service's broker connection; see the module docstring for the rules.

    ``url``: the broker, named in every line. ``startup_timeout_s``: how long the first
    connection may take before exit 69 (None: wait forever). ``started_at``: the time the
    service started (same clock as every ``now``). ``identity``: the configured id the
    ACL should know (edge: ``[device] id``; aggregator: ``broker.client_id``).
    ``own_topics``: topics and filters the service cannot work without."""

    def __init__(
        self,
        url: str,
        startup_timeout_s: float | None,
        *,
        started_at: float,
        identity: str = "",
        own_topics: Iterable[str] = (),
    ) -> None:
        self.url = url
        self.startup_timeout_s = startup_timeout_s
        self.started_at = started_at
        self.identity = identity
        self.own_topics = tuple(own_topics)
        self._state = State.STARTING
        self._connected_once = False
        self._failures = 0  # failed attempts since the last connection
        self._last_reason = ""
        self._offline_since: float | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def connected_once(self) -> bool:
        return self._connected_once

    def handle(self, event: TransportEvent, now: float) -> Verdict | None:
        """The verdict on one transport event (None: nothing to say)."""
        if self._state is State.GAVE_UP:
            return None
        what = self._input(event)
        if what is None:
            return None
        if what in (Input.FAILED, Input.FAILED_PERMANENTLY) and isinstance(event, ConnectFailed):
            self._failures += 1
            self._last_reason = event.reason
        verdict: Verdict | None
        if what is Input.FAILED and self._deadline_passed(now):
            what, verdict = Input.DEADLINE, self._deadline(now)
        else:
            verdict = self._verdict(what, event, now)  # judged in the state before the event
        self._state = _NEXT.get((self._state, what), self._state)
        return verdict

    def check(self, now: float) -> Verdict | None:
        """Call when idle: gives up with 69 once the startup deadline has passed."""
        if not self._deadline_passed(now):
            return None
        self._state = State.GAVE_UP
        return self._deadline(now)

    # ------------------------------------------------------------------ rules

    def _input(self, event: TransportEvent) -> Input | None:
        if isinstance(event, Connected):
            return Input.CONNECTED
        if isinstance(event, Disconnected):
            return None if event.reason == "stopped" else Input.LOST
        if isinstance(event, ConnectFailed):
            return Input.FAILED_PERMANENTLY if event.permanent else Input.FAILED
        if isinstance(event, PublishDenied):
            own = any(topic_matches(f, event.topic) for f in self.own_topics)
            return Input.DENIED_OWN if own and event.reason_code == REASON_NOT_AUTHORIZED else Input.DENIED
        if isinstance(event, SubscriptionRefused):
            own = event.topic_filter in self.own_topics
            return Input.DENIED_OWN if own and event.reason_code == REASON_NOT_AUTHORIZED else Input.DENIED
        return None

    def _deadline_passed(self, now: float) -> bool:
        return (
            self._state is State.STARTING
            and self.startup_timeout_s is not None
            and now - self.started_at >= self.startup_timeout_s
        )

    def _verdict(self, what: Input, event: TransportEvent, now: float) -> Verdict | None:
        if what is Input.CONNECTED:
            return self._connected(now)
        if what is Input.LOST:
            assert isinstance(event, Disconnected)
            self._offline_since = now
            return Verdict(logging.WARNING, f"lost the connection to {self.url}: {event.reason}; reconnecting")
        if what in (Input.FAILED, Input.FAILED_PERMANENTLY):
            assert isinstance(event, ConnectFailed)
            return self._failed(event, now)
        if what is Input.DENIED_OWN:
            return self._denied_own(event)
        return self._denied(event)

    def _connected(self, now: float) -> Verdict:
        failures, self._failures = self._failures, 0
        self._connected_once = True
        if self._state is State.STARTING:
            after = f" after {failures} failed attempts" if failures else ""
            return Verdict(logging.INFO, f"connected to {self.url}{after}")
        offline = f" after {now - self._offline_since:.0f} s offline" if self._offline_since is not None else ""
        self._offline_since = None
        return Verdict(logging.INFO, f"reconnected to {self.url}{offline}")

    def _failed(self, event: ConnectFailed, now: float) -> Verdict:
        retry = f"; retrying in {event.retry_in_s:.1f} s" if event.retry_in_s is not None else "; retrying"
        if self._state is State.STARTING:
            if event.permanent:
                code = EXIT_NOT_AUTHORIZED if event.not_authorized else EXIT_CONFIG
                return Verdict(logging.ERROR, f"cannot connect to {self.url}: {event.reason}{GIVING_UP}{_GIVING_UP[code]}", code)
            left = ""
            if self.startup_timeout_s is not None:
                remaining = max(0.0, self.started_at + self.startup_timeout_s - now)
                left = f" (exit 69 if not connected within {remaining:.0f} s)"
            return Verdict(logging.WARNING, f"cannot connect to {self.url}: {event.reason}{retry}{left}")
        if self._offline_since is None:
            self._offline_since = now
        offline = f" (offline for {now - self._offline_since:.0f} s)"
        if event.permanent:
            return Verdict(logging.ERROR, f"cannot reconnect to {self.url}: {event.reason}; "
                           f"this needs an operator{retry}{offline}")
        return Verdict(logging.WARNING, f"cannot reconnect to {self.url}: {event.reason}{retry}{offline}")

    def _deadline(self, now: float) -> Verdict:
        last = f"; last problem: {self._last_reason}" if self._last_reason else "; no answer yet"
        return Verdict(
            logging.ERROR,
            f"no connection to {self.url} within {now - self.started_at:.0f} s "
            f"({self._failures} failed attempts{last}){GIVING_UP}{_GIVING_UP[EXIT_UNAVAILABLE]}",
            EXIT_UNAVAILABLE,
        )

    def _denied_own(self, event: TransportEvent) -> Verdict:
        if isinstance(event, PublishDenied):
            what, code = f"our publish on {event.topic}", event.reason_code
        else:
            assert isinstance(event, SubscriptionRefused)
            what, code = f"our subscription to {event.topic_filter}", event.reason_code
        identity = f"the configured id {self.identity!r}" if self.identity else "the configured id"
        return Verdict(
            logging.ERROR,
            f"the broker at {self.url} refused {what}: {REASON_NAMES.get(code, code)} ({code}). "
            f"This is permanent: the broker's ACL allows each client the topics named after "
            f"the name (CN) in its certificate, so {identity} differs from the name in the "
            f"client certificate (broker.cert_file), or the broker's ACL does not cover this "
            f"fleet or task (a task declared with `fedgate provision task` needs the broker "
            f"reloaded: kill -HUP). Make them agree (`fedgate config check FILE` shows both)"
            f"{GIVING_UP}{_GIVING_UP[EXIT_NOT_AUTHORIZED]}",
            EXIT_NOT_AUTHORIZED,
        )

    def _denied(self, event: TransportEvent) -> Verdict:
        if isinstance(event, PublishDenied):
            return Verdict(logging.WARNING, f"the broker at {self.url} refused our publish on "
                           f"{event.topic}: {event.reason} ({event.reason_code})")
        assert isinstance(event, SubscriptionRefused)
        name = REASON_NAMES.get(event.reason_code, f"reason code {event.reason_code}")
        return Verdict(logging.WARNING, f"the broker at {self.url} refused our subscription to "
                       f"{event.topic_filter}: {name} ({event.reason_code})")
