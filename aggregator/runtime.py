"""The aggregator service: the only aggregator module with clocks, files and the network.

One thread runs the loop: it takes transport events from a queue, decodes and verifies
messages, feeds the pure :class:`RoundStateMachine` and carries out its actions (publish,
checkpoint, log). Timer ticks drive deadlines. The transport's own thread only enqueues.
"""

from __future__ import annotations

import logging
import queue
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from aggregator import checkpoint as checkpoints
from aggregator import rounds as sm
from aggregator.config import AggregatorConfig
from aggregator.fusion import ServerUpdateFn, make_fuse
from aggregator.security import AggregatorSecurity
from fedcore.errors import RemoteProtocolError
from fedcore.learning.models import init_params
from fedcore.protocol import codec
from fedcore.protocol.messages import Kind, ModelUpdate, Status
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.systemd import SystemdNotifier
from fedcore.transport.base import Connected, Disconnected, MessageReceived, Transport

if TYPE_CHECKING:
    from aggregator.metrics import AggregatorMetrics

log = logging.getLogger("fedgate.aggregator")
TICK_S = 0.2


class AggregatorService:
    def __init__(
        self,
        config: AggregatorConfig,
        transport: Transport,
        security: AggregatorSecurity,
        ledger: sm.Ledger | None = None,
        server_update: ServerUpdateFn | None = None,
        clock: Callable[[], float] = time.time,
        notifier: SystemdNotifier | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.security = security
        self.clock = clock
        self.notifier = notifier or SystemdNotifier(None)
        self.topics = Topics(config.fleet, config.task)
        self.events: queue.Queue[object] = queue.Queue()
        self.rejected: Counter[str] = Counter()  # message-level and update rejections
        self.stopping = threading.Event()
        self.finished = False
        self._last_down = (0, 0)  # sizes of the last published model and round messages
        rng = np.random.default_rng(config.seed)
        weights = init_params(config.spec, rng)
        self.machine = sm.RoundStateMachine(
            config.rounds,
            config.spec,
            weights,
            random.Random(config.seed),
            fuse=make_fuse(config.fusion.rule, config.fusion.params, server_update),
            decode=security.decode_delta,
            ledger=ledger,
        )
        saved = checkpoints.load(config.state_dir)
        if saved is not None:
            self.machine.restore(saved)
            security.restore(saved.meta)
            log.info("resumed from checkpoint: round %s, model version %s",
                     saved.meta["round"], saved.meta["version"])
        self.metrics: AggregatorMetrics | None = None
        if config.metrics_port:
            from aggregator.metrics import AggregatorMetrics

            self.metrics = AggregatorMetrics(config.metrics_port, config.metrics_addr)

    # ---- loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until the configured rounds are done (if exit_when_done) or stop() is called."""
        self.transport.start(self.events.put)
        started = False
        while not self.stopping.is_set():
            self.notifier.watchdog()
            try:
                item = self.events.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            now = self.clock()
            if isinstance(item, Connected):
                self._on_connected(item)
                if not started:
                    started = True
                    self._apply(self.machine.handle(sm.Started(now)))
                elif not item.session_present:
                    log.warning("the broker lost our session: re-publishing model and round")
                    self._apply(self.machine.handle(sm.BrokerSessionLost(now)))
            elif isinstance(item, Disconnected):
                log.warning("broker connection lost: %s", item.reason)
            elif isinstance(item, MessageReceived):
                self._on_message(item, now)  # subscriptions start after Started
            if started:
                self._apply(self.machine.handle(sm.Tick(now)))
                self._operator_commands()
            if self.finished and self.config.exit_when_done:
                break
        self.notifier.notify("STOPPING=1")
        self.transport.stop()
        if self.metrics is not None:
            self.metrics.close()
        return 0

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # ---- inbound ---------------------------------------------------------------------------

    def _operator_commands(self) -> None:
        """Commands dropped into ``state_dir/commands`` by `fedgate aggregator release`."""
        folder = self.config.state_dir / "commands"
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("release-*")):
            device = path.name.removeprefix("release-")
            path.unlink(missing_ok=True)
            actions = self.machine.release(device)
            if not actions:
                log.warning("release %s: it is not quarantined", device)
            self._apply(actions)

    def _on_connected(self, event: Connected) -> None:
        for topic in (self.topics.updates_filter(), self.topics.status_filter()):
            self.transport.subscribe(topic, qos=1)
        log.info("connected to broker (session present: %s)", event.session_present)
        self.notifier.notify(f"READY=1\nSTATUS=round {self.machine.round}, model version "
                             f"{self.machine.version}")

    def _on_message(self, msg: MessageReceived, now: float) -> None:
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind is TopicKind.STATUS:
                self._on_status(parsed.device or "", msg, now)
            elif parsed.kind is TopicKind.UPDATE:
                env = self.security.open(msg.payload, parsed.device or "", Kind.UPDATE)
                self._check_scope(env)
                update = codec.decode_body(env, ModelUpdate)
                if env.round != update.round:
                    raise RemoteProtocolError("bad_round", "envelope and body rounds differ")
                wire = len(msg.payload) + len(msg.topic)
                self._apply(self.machine.handle(
                    sm.UpdateReceived(now, env.sender, env.message_id, update, wire)))
        except RemoteProtocolError as exc:
            self._count_rejection(exc.reason)
            self.security.audit_rejection(msg.topic, exc.reason, exc.detail, now)
            log.warning("rejected message on %s: %s", msg.topic, exc)

    def _check_scope(self, env: codec.Envelope) -> None:
        if env.fleet != self.config.fleet or env.task != self.config.task:
            raise RemoteProtocolError("wrong_task", f"{env.fleet}/{env.task}")

    def _on_status(self, device: str, msg: MessageReceived, now: float) -> None:
        if not msg.payload:
            return  # a cleared retained status
        env = self.security.open(msg.payload, device, Kind.STATUS)
        status = codec.decode_body(env, Status)
        event = sm.DeviceOnline(now, device) if status.state == "online" else sm.DeviceOffline(now, device)
        self._apply(self.machine.handle(event))

    def _count_rejection(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected.labels(reason=reason).inc()

    # ---- outbound --------------------------------------------------------------------------

    def _publish(self, kind: Kind, topic: str, body: msgspec.Struct, round_: int) -> int:
        env = codec.make_envelope(kind, self.config.fleet, self.config.task, round_,
                                  self.config.broker.client_id, body, self.clock())
        payload = codec.encode(self.security.sign(env))
        self.transport.publish(topic, payload, qos=1, retain=True)
        return len(payload) + len(topic)

    def _apply(self, actions: list[sm.Action]) -> None:
        for action in actions:
            if isinstance(action, sm.SaveCheckpoint):
                self.security.before_checkpoint(action.checkpoint)
                checkpoints.save(self.config.state_dir, action.checkpoint)
            elif isinstance(action, sm.PublishModel):
                size = self._publish(Kind.MODEL, self.topics.model(), action.model, action.model.round)
                self._last_down = (size, self._last_down[1])
                self.security.audit("model_commit", self.clock(), version=action.model.version,
                                    parent=action.model.parent_hash.hex())
            elif isinstance(action, sm.PublishRound):
                ann = action.announcement
                self.security.on_round(ann.round)
                size = self._publish(Kind.ROUND, self.topics.round(), ann, ann.round)
                self._last_down = (self._last_down[0], size)
                log.info("round %d announced on model version %d", ann.round, ann.model_version)
            elif isinstance(action, sm.PublishMetrics):
                summary = action.summary
                down = sum(self._last_down) * len(summary.participants)
                summary = msgspec.structs.replace(summary, bytes_down=down)
                self._publish(Kind.METRICS, self.topics.metrics(), summary, summary.round)
                log.info("round %d committed: %d participants, %s", summary.round,
                         len(summary.participants), summary.metrics)
                if self.metrics is not None:
                    self.metrics.on_summary(summary)
            elif isinstance(action, sm.UpdateRejected):
                self._count_rejection(action.reason)
                self.security.audit_rejection(action.device, action.reason, action.detail, self.clock())
                log.warning("update from %s for round %d rejected: %s %s",
                            action.device, action.round, action.reason, action.detail)
            elif isinstance(action, sm.UpdateAccepted):
                if self.metrics is not None:
                    self.metrics.accepted.inc()
            elif isinstance(action, sm.QuorumMissed):
                log.warning("round %d: quorum missed (%d of %d); deadline extended",
                            action.round, action.received, action.needed)
            elif isinstance(action, sm.GatewayQuarantined):
                if self.metrics is not None:
                    self.metrics.quarantined.inc()
                log.warning("gateway %s quarantined in round %d (score %.2f)", action.device,
                            action.round, action.score)
                self.security.audit("quarantine", self.clock(), device=action.device,
                                    round=action.round, score=action.score)
            elif isinstance(action, sm.GatewayReleased):
                log.warning("gateway %s released by the operator", action.device)
                self.security.audit("release", self.clock(), device=action.device, round=action.round)
            elif isinstance(action, sm.RunFinished):
                self.finished = True
                log.info("run finished after round %d (model version %d)",
                         action.round, action.model_version)
