"""Watching a fleet's retained topics over MQTT (``fedgate status``, the dashboard).

:class:`FleetWatch` subscribes, as a read-only operator, to the gateways' statuses and to
each task's state, round summary and deployment record, decodes them - verifying every
signature against the fleet keyring when the operator's bundle carries one - and keeps a
:class:`~fedgate.fleetview.FleetView` up to date from the transport's thread. Messages that
fail to decode or verify are counted in the view, never shown.

The connection: ``--broker mqtt://host:port`` or ``mqtts://...`` with ``--tls-dir BUNDLE``,
a folder from ``fedgate provision operator NAME`` (``ca.crt``, ``client.crt``,
``client.key``, ``keyring.json``, ``revoked.json``). Each watcher connects with its own
random client id and a clean session: it leaves nothing behind on the broker.
"""

from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

from fedcore.errors import ConfigError, LocalProtocolError, RemoteProtocolError
from fedcore.protocol import codec, signing
from fedcore.protocol.messages import Deployment, Kind, RoundSummary, Status, TaskState
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.transport.base import (
    Connected,
    Disconnected,
    MessageReceived,
    SubscriptionRefused,
    TlsSettings,
    TransportEvent,
)
from fedcore.transport.paho import PahoTransport
from fedgate.fleetview import FleetView

_KINDS = {TopicKind.STATUS: Kind.STATUS, TopicKind.STATE: Kind.STATE,
          TopicKind.METRICS: Kind.METRICS, TopicKind.DEPLOYMENT: Kind.DEPLOYMENT}


def tls_from_bundle(bundle: Path | None) -> tuple[TlsSettings | None, signing.Keyring | None]:
    """mTLS settings and keyring of an operator (or any) bundle folder."""
    if bundle is None:
        return None, None
    files = {name: bundle / name for name in ("ca.crt", "client.crt", "client.key")}
    for name, path in files.items():
        if not path.is_file():
            raise ConfigError("<command line>", "--tls-dir", str(bundle), f"has no {name}")
    keyring = None
    if (bundle / "keyring.json").is_file():
        keyring = signing.load_keyring(bundle / "keyring.json", bundle / "revoked.json")
    return TlsSettings(files["ca.crt"], files["client.crt"], files["client.key"]), keyring


class FleetWatch:
    def __init__(self, url: str, fleet: str, task: str | None = None,
                 bundle: Path | None = None) -> None:
        self.fleet = fleet
        self.task = task
        self.view = FleetView(fleet)
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.connected = threading.Event()
        self.last_message = 0.0
        tls, self.keyring = tls_from_bundle(bundle)
        if url.startswith("mqtts://") and tls is None:
            raise ConfigError("<command line>", "--tls-dir", None,
                              "an mqtts:// broker needs the operator bundle (fedgate provision operator)")
        if url.startswith("mqtt://") and tls is not None:
            raise ConfigError("<command line>", "--tls-dir", str(bundle),
                              f"is for a TLS broker; {url} is plain MQTT (use mqtts://)")
        try:
            self.transport = PahoTransport(url, f"fedgate-watch-{os.urandom(4).hex()}",
                                           clean_start=True, session_expiry=0, tls=tls,
                                           rng=random.Random())
        except LocalProtocolError as exc:  # a malformed URL: the operator's to fix
            raise ConfigError("<command line>", "--broker", url, str(exc)) from None
        self.refused: list[str] = []  # subscriptions the broker refused

    def _filters(self) -> list[str]:
        topics = Topics(self.fleet, self.task or "x")
        filters = [topics.status_filter()]
        for leaf in ("state", "metrics", "deployment"):
            filters.append(getattr(topics, leaf)() if self.task else topics.task_filter(leaf))
        return filters

    def start(self) -> None:
        self.transport.start(self._on_event)

    def stop(self) -> None:
        self.transport.stop()

    def wait_settled(self, timeout: float, quiet: float = 0.5) -> bool:
        """Wait until connected and no retained message arrived for ``quiet`` seconds (or
        ``timeout`` passed); False only when it never connected."""
        deadline = time.monotonic() + timeout
        if not self.connected.wait(timeout):
            return False
        while time.monotonic() < deadline:
            if time.monotonic() - max(self.last_message, self._connected_at) >= quiet:
                return True
            time.sleep(0.05)
        return True

    def _on_event(self, event: TransportEvent) -> None:
        if isinstance(event, Connected):
            self._connected_at = time.monotonic()
            for topic_filter in self._filters():
                self.transport.subscribe(topic_filter, qos=1)
            self.connected.set()
        elif isinstance(event, SubscriptionRefused):
            self.refused.append(event.topic_filter)
            self.changed.set()
        elif isinstance(event, Disconnected):
            self.connected.clear()
            self.changed.set()
        elif isinstance(event, MessageReceived):
            self.last_message = time.monotonic()
            if event.payload:
                with self.lock:
                    self._on_message(event.topic, event.payload)
                self.changed.set()

    _connected_at = 0.0

    def _on_message(self, topic: str, payload: bytes) -> None:
        view = self.view
        try:
            parsed = parse_topic(topic)
            kind = _KINDS.get(parsed.kind)
            if kind is None or parsed.fleet != self.fleet:
                return
            env = codec.decode(payload)
            if env.kind != kind.value:
                raise RemoteProtocolError("bad_kind", env.kind[:20])
            if self.keyring is not None:
                signing.authenticate(env, self.keyring, None,
                                     parsed.device if parsed.kind is TopicKind.STATUS else None)
            task = parsed.task or env.task
            if parsed.kind is TopicKind.STATUS:
                view.on_status(parsed.device or env.sender, env.task, codec.decode_body(env, Status),
                               time.time())
            elif parsed.kind is TopicKind.STATE:
                view.on_state(task, codec.decode_body(env, TaskState))
            elif parsed.kind is TopicKind.METRICS:
                view.on_summary(task, codec.decode_body(env, RoundSummary))
            else:
                view.on_deployment(task, codec.decode_body(env, Deployment))
        except RemoteProtocolError as exc:
            view.on_rejected(exc.reason)

    def snapshot(self) -> dict[str, object]:
        with self.lock:
            return self.view.to_dict(time.time(), self.task)
