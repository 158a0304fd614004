"""The aggregator service: the only aggregator module with clocks, files and the network.

One thread runs the loop: it takes transport events from a queue, decodes and verifies
messages, feeds the pure :class:`~aggregator.rounds.RoundStateMachine` and
:class:`~aggregator.deployment.DeploymentManager`, and carries out their actions (publish,
checkpoint, audit, log). Timer ticks drive deadlines, the schedule and canary timeouts;
operator commands (``aggregator.commands``) are picked up every turn. The transport's own
thread only enqueues.

Durability comes first: a checkpoint is written before anything that depends on it is
published. When it cannot be written (a full disk), the actions that depend on it are
held, the failure is logged once with the reason and exported as a metric, and the write
is retried every few seconds; the service keeps running and catches up once space is free.

Besides the round topics it publishes, retained and signed: the task state for operators
(``.../state``), the deployment record for gateways (``.../deployment``) and the deployed
model as .tflite for other plant systems (``.../deployed``).
"""

from __future__ import annotations

import logging
import math
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from aggregator import checkpoint as checkpoints
from aggregator import commands
from aggregator import deployment as dm
from aggregator import rounds as sm
from aggregator.chunked import ChunkedLink
from aggregator.config import AggregatorConfig
from aggregator.fusion import ServerUpdateFn, make_fuse
from aggregator.inbox import Inbox
from aggregator.security import AggregatorSecurity
from aggregator.state_writer import StateWriter
from aggregator.status_check import check_status
from aggregator.task_state import task_state
from fedcore.errors import RemoteProtocolError
from fedcore.learning.models import init_params
from fedcore.protocol import codec
from fedcore.protocol.chunks import ChunkLimits
from fedcore.protocol.messages import (
    CanaryReport,
    ChunkManifest,
    DataStats,
    Deployment,
    Kind,
    ModelUpdate,
    RoundSummary,
    Status,
    TaskState,
)
from fedcore.protocol.tensors import encode_tensors
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.systemd import SystemdNotifier
from fedcore.trace import NoTrace, Tracer
from fedcore.transport.base import (
    Connected,
    MessageReceived,
    PayloadTooLargeError,
    Transport,
)
from fedcore.transport.connection import ConnectionWatch

if TYPE_CHECKING:
    from aggregator.metrics import AggregatorMetrics

log = logging.getLogger("fedgate.aggregator")
TICK_S = 0.2
STATE_EVERY_S = 30.0
# a gateway refusing rounds under its own [privacy] policy is not waited for either
NOT_READY = ("waiting_for_data", "incompatible", "refusing")
INBOX_MESSAGES = 2  # payload bytes waiting in the inbox: this many of the largest messages
Carried = sm.Action | dm.DeployAction  # what the loop carries out, in order


# What an operator can do about a rejection that is usually the fleet's own doing.
_HINTS = {
    "unknown_key": " (a gateway provisioned after the aggregator started? copy the fleet's keyring.json "
                   "to the aggregator's security.keyring and restart it)",
}


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
        metrics: AggregatorMetrics | None = None,
        trace: Tracer | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.security = security
        self.clock = clock
        self.notifier = notifier or SystemdNotifier(None)
        self.metrics = metrics
        self.trace = trace or NoTrace()
        self.topics = Topics(config.fleet, config.task)
        # at most a few of the largest messages waiting (aggregator.inbox: back-pressure)
        self.events = Inbox(INBOX_MESSAGES * security.limits.max_message_bytes)
        self.rejected: Counter[str] = Counter()  # message-level and update rejections
        self._housekept_at = 0.0
        self.stopping = threading.Event()
        self.finished = False
        self._last_down = (0, 0)  # sizes of the last published model and round messages
        self.rng = random.Random(config.seed)
        weights = init_params(config.spec, np.random.default_rng(config.seed))
        self.machine = sm.RoundStateMachine(
            config.rounds,
            config.spec,
            weights,
            random.Random(config.seed),
            fuse=make_fuse(config.fusion.rule, config.fusion.params, server_update),
            decode=security.decode_delta,
            ledger=ledger,
        )
        self.deploy = dm.DeploymentManager(config.deploy, self.machine.metric,
                                           self.machine.metric_higher_is_better)
        saved = checkpoints.load(config.state_dir)  # DamagedCheckpoint: a config error (main)
        if saved is not None:
            self.machine.restore(saved)  # IncompatibleState: the caller makes it a config error
            security.restore(saved.meta)
            if saved.meta.get("deployment"):
                self.deploy.restore(saved.meta["deployment"])
            log.info("resumed lineage %s from %s: round %s, model version %s",
                     self.machine.lineage or "(none)", config.state_dir, saved.meta["round"],
                     saved.meta["version"])
        self.writer = StateWriter(config.state_dir, config.keep_models, metrics, clock)
        # messages over the broker's limit travel as chunks, up to what the decoder accepts;
        # assemblies are files (sparse until filled), so many gateways may send at once
        self.chunked = ChunkedLink(transport, self.topics, config.state_dir, ChunkLimits(
            max_message_bytes=security.limits.max_message_bytes, max_assemblies=64,
            max_total_bytes=1024 * 1024 * 1024))
        if saved is not None:  # its model file, if a crash lost it
            self.writer.models_due[int(saved.meta["version"])] = saved.weights
        self._held: list[Carried] = []  # actions waiting for a checkpoint that failed
        self._after_announcement: list[sm.ModelCommitted] = []  # bookkeeping off the critical path
        self._command_error = False
        self._state_key = b""
        self._state_at = 0.0
        if self.metrics is not None:  # right from the start, not 0 until the next round
            self.metrics.on_state(self.task_state(clock()))

    # ---- loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Run until the configured rounds are done (if exit_when_done) or stop() is called;
        returns the exit code (0, or the broker watch's 69/77/78)."""
        watch = self._connection_watch()
        self.transport.start(self.events.put)
        started = False
        code = 0
        while not self.stopping.is_set():
            self.notifier.watchdog()
            item = self.events.get(timeout=TICK_S)
            verdict = watch.check(time.monotonic()) if item is None else watch.handle(item, time.monotonic())
            if verdict is not None:
                log.log(verdict.level, "%s", verdict.message)
                if verdict.exit_code is not None:
                    code = verdict.exit_code
                    break
            now = self.clock()
            if isinstance(item, Connected):
                self._on_connected(item)
                if not started:
                    started = True
                    self._apply(self.machine.handle(sm.Started(now, os.urandom(4))))
                    self._apply_deploy(self.deploy.on_start(self.machine.version, now))
                    self._publish_deployed()
                    for device, whole in self.chunked.take_restored():  # assembled before a restart
                        self._on_message(MessageReceived(self.topics.update(device), whole, False), now,
                                         assembled=True)
                else:  # a restarted broker may serve older retained copies: ours again
                    if item.session_present:
                        log.info("reconnected: re-publishing the retained model, round and deployment")
                    else:
                        log.warning("the broker lost our session: re-publishing model, round and state")
                    self._apply(self.machine.handle(sm.BrokerSessionLost(now)))
                    self._republish_deployment()
            elif isinstance(item, MessageReceived):
                self._on_message(item, now)  # subscriptions start after Started
            if started:
                self._retry_held(now)
                self._apply(self.machine.handle(sm.Tick(now)))
                self._apply_deploy(self.deploy.on_tick(now))
                # a burst of updates and statuses is taken first: the command folder and
                # the task state are looked at when the queue is quiet, or every TICK_S
                if item is None or time.monotonic() - self._housekept_at >= TICK_S:
                    self._housekept_at = time.monotonic()
                    self._operator_commands(now)
                    self._publish_state(now)
            if self.finished and self.config.exit_when_done:
                break
        self.notifier.notify("STOPPING=1")
        log.info("stopping at round %d, model version %d (exit %d)", self.machine.round,
                 self.machine.version, code)
        self.trace.close()
        self.events.close()  # a network thread blocked on a full inbox must not hold stop()
        self.transport.stop()
        if self.metrics is not None:
            self.metrics.close()
        return code

    def _connection_watch(self) -> ConnectionWatch:
        t = self.topics
        own = (t.round(), t.model(), t.model_chunks_filter(), t.metrics(), t.state(), t.deployment(),
               t.deployed(), t.updates_filter(), t.update_chunks_filter(), t.status_filter())
        timeout = self.config.broker.startup_timeout_s or None
        return ConnectionWatch(self.config.broker.url, timeout, started_at=time.monotonic(),
                               identity=self.config.broker.client_id, own_topics=own)

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    # ---- inbound ---------------------------------------------------------------------------

    def _on_connected(self, event: Connected) -> None:
        for topic in (self.topics.updates_filter(), self.topics.update_chunks_filter(),
                      self.topics.status_filter()):
            self.transport.subscribe(topic, qos=1)
        log.info("connected to broker (session present: %s)", event.session_present)
        self.notifier.notify(f"READY=1\nSTATUS=lineage {self.machine.lineage or 'new'}, round "
                             f"{self.machine.round}, model version {self.machine.version}")

    def _on_message(self, msg: MessageReceived, now: float, assembled: bool = False) -> None:
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind is TopicKind.STATUS:
                self._on_status(parsed.device or "", msg, now)
            elif parsed.kind is TopicKind.UPDATE:
                self._on_device_message(parsed.device or "", msg, now, assembled)
            elif parsed.kind is TopicKind.UPDATE_CHUNK:
                device = parsed.device or ""
                whole = self.chunked.on_chunk(device, msg.payload)
                if whole is not None:  # checked from here on as if it had come in one piece
                    self._on_message(MessageReceived(self.topics.update(device), whole, False, msg.arrived),
                                     now, assembled=True)
        except RemoteProtocolError as exc:
            self._count_rejection(exc.reason)
            self.security.audit_rejection(msg.topic, exc.reason, exc.detail, now)
            # a copy of a message already taken is what QoS 1 and every resend produce: counted
            # and audited like any rejection, but no warning for the operator to chase
            level = logging.INFO if exc.reason == "replayed" else logging.WARNING
            log.log(level, "rejected message on %s: %s%s", msg.topic, exc, _HINTS.get(exc.reason, ""))

    def _on_device_message(self, device: str, msg: MessageReceived, now: float,
                           assembled: bool = False) -> None:
        """The device's own topic carries its updates, statistics and canary reports, or the
        manifest of one sent in chunks (never inside an assembled message)."""
        kinds = (Kind.UPDATE, Kind.STATS, Kind.CANARY) + (() if assembled else (Kind.MANIFEST,))
        env = self.security.open(msg.payload, device, kinds)
        self._check_scope(env)
        kind = Kind(env.kind)
        if kind is Kind.MANIFEST:
            manifest = codec.decode_body(env, ChunkManifest)
            if manifest.kind not in (Kind.UPDATE, Kind.STATS, Kind.CANARY):
                raise RemoteProtocolError("bad_kind", f"a chunked {manifest.kind[:20]!r} on an update topic")
            self.chunked.on_manifest(device, manifest)
        elif kind is Kind.STATS:
            stats = codec.decode_body(env, DataStats)
            self._apply(self.machine.handle(sm.StatsReceived(now, env.sender, stats)))
        elif kind is Kind.CANARY:
            report = codec.decode_body(env, CanaryReport)
            outcome = self.deploy.on_report(env.sender, report, now)
            if isinstance(outcome, str):
                raise RemoteProtocolError(outcome, f"canary report {report.sequence}")
            log.info("canary report from %s: candidate %d %s %.4g, incumbent %d %.4g",
                     env.sender, report.candidate, self.machine.metric,
                     report.candidate_metrics.get(self.machine.metric, math.nan), report.incumbent,
                     report.incumbent_metrics.get(self.machine.metric, math.nan))
            # a report is kept in the checkpoint: a restarted aggregator decides on it too
            self._apply([sm.SaveCheckpoint(self.machine.checkpoint()), *outcome])
        else:
            update = codec.decode_body(env, ModelUpdate)
            if env.round != update.round:
                raise RemoteProtocolError("bad_round", "envelope and body rounds differ")
            wire = len(msg.payload) + len(msg.topic)
            self.trace.mark("update_received", round=update.round, device=env.sender,
                            sent=env.timestamp, arrived=msg.arrived, start=now)
            actions = self.machine.handle(sm.UpdateReceived(now, env.sender, env.message_id, update, wire))
            if any(isinstance(a, sm.ModelCommitted) for a in actions):
                self.trace.mark("fused", round=update.round)  # validated, fused, model encoded
            self._apply(actions)

    def _check_scope(self, env: codec.Envelope) -> None:
        if env.fleet != self.config.fleet or env.task != self.config.task:
            raise RemoteProtocolError("wrong_task", f"{env.fleet}/{env.task}")

    def _on_status(self, device: str, msg: MessageReceived, now: float) -> None:
        if not msg.payload:
            return  # a cleared retained status, or a preflight check's empty message
        env = self.security.open(msg.payload, device, Kind.STATUS)
        if env.task != self.config.task:
            return  # a gateway of another task of the fleet: not ours to wait for
        status = codec.decode_body(env, Status)
        check_status(status)  # a state or count the gateway software cannot send: refused
        if status.state == "online":
            ready = status.activity not in NOT_READY
            event: sm.Event = sm.DeviceOnline(now, device, ready, max(0, status.rows_new))
            if device not in self.machine.online:
                log.info("gateway %s online (%s)", device, status.activity or "ready")
        else:
            event = sm.DeviceOffline(now, device)
            if device in self.machine.online:
                log.info("gateway %s offline", device)
        self._apply(self.machine.handle(event))

    def _count_rejection(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected.inc(reason=reason)

    # ---- operator commands -------------------------------------------------------------------

    def _operator_commands(self, now: float) -> None:
        try:
            pending = commands.take_pending(self.config.state_dir)
        except OSError as exc:
            if not self._command_error:
                log.error("cannot take operator commands from %s/commands: %s", self.config.state_dir,
                          exc.strerror or exc)
            self._command_error = True
            return
        self._command_error = False
        for ident, command in pending:
            ok, message = self._command(command, now)
            if ok and self._held:
                message += ("; held: the state cannot be written now (disk full?), it takes "
                            "effect once it can")
            (log.info if ok else log.warning)("operator command %s: %s", command.get("command"), message)
            try:
                commands.answer(self.config.state_dir, ident, ok, message)
            except OSError as exc:
                log.error("cannot answer operator command %s: %s", ident, exc)

    def _command(self, command: dict[str, object], now: float) -> tuple[bool, str]:
        name = command.get("command")
        if name == "release":
            device = str(command.get("device", ""))
            actions = self.machine.release(device)
            self._apply(actions)
            return (True, f"{device} released") if actions else (False, f"{device} is not quarantined")
        if name == "deploy" and command.get("version") == "latest":
            self._apply_deploy(self.deploy.follow_latest(self.machine.version, now))
            return True, f"the fleet follows the newest model (now version {self.machine.version})"
        if name == "deploy":
            version = command.get("version")
            if not isinstance(version, int) or checkpoints.load_model(self.config.state_dir, version) is None:
                kept = checkpoints.kept_versions(self.config.state_dir)
                return False, f"version {version} is not kept (kept: {_ranges(kept)})"
            self._apply_deploy(self.deploy.deploy(version, now, f"operator: deploy {version}"))
            return True, f"version {version} deployed (record {self.deploy.sequence})"
        if name == "rollback":
            target = self.deploy.rollback_target(self.machine.version)
            if target is None or checkpoints.load_model(self.config.state_dir, target) is None:
                return False, "no earlier version to roll back to"
            self._apply_deploy(self.deploy.deploy(target, now, f"operator: rollback to {target}"))
            return True, f"rolled back to version {target} (record {self.deploy.sequence})"
        return False, f"unknown command {name!r}"

    # ---- outbound --------------------------------------------------------------------------

    def _publish(self, kind: Kind, topic: str, body: msgspec.Struct, round_: int) -> int:
        env = codec.make_envelope(kind, self.config.fleet, self.config.task, round_,
                                  self.config.broker.client_id, body, self.clock())
        payload = codec.encode(self.security.sign(env))
        if topic == self.topics.model():  # the one message that may be larger than a packet
            return self.chunked.publish_model(payload, lambda manifest: self._seal(manifest, round_))
        self.transport.publish(topic, payload, qos=1, retain=True)
        return len(payload) + len(topic)

    def _seal(self, manifest: ChunkManifest, round_: int) -> bytes:
        env = codec.make_envelope(Kind.MANIFEST, self.config.fleet, self.config.task, round_,
                                  self.config.broker.client_id, manifest, self.clock())
        return codec.encode(self.security.sign(env))

    def _save(self, action: sm.SaveCheckpoint) -> bool:
        checkpoint = action.checkpoint
        self.security.before_checkpoint(checkpoint)
        checkpoint.meta["deployment"] = self.deploy.to_dict()
        return self.writer.checkpoint(checkpoint, self.machine.round)

    def _save_model_files(self) -> None:
        self.writer.model_files({self.deploy.version, *self.deploy.needed()})

    def _retry_held(self, now: float) -> None:
        if not self.writer.may_retry(now):
            return
        if self._held:
            held, self._held = self._held, []
            self._apply(held)
        elif self.writer.models_due:
            self._save_model_files()

    def _apply(self, actions: Sequence[Carried]) -> None:
        if self._held:
            self._held.extend(actions)  # keep the order: nothing overtakes a failed write
            return
        for i, action in enumerate(actions):
            if isinstance(action, sm.SaveCheckpoint):
                if not self._save(action):
                    self._held = list(actions[i:])
                    return
                self.trace.mark("checkpoint_saved", round=self.machine.round)
            else:
                self._carry_out(action)
                if isinstance(action, sm.PublishRound):
                    self._after_round_out()
        self._after_round_out()

    def _after_round_out(self) -> None:
        """What waited for the model and the next announcement: the model file (a canary's
        deployment needs it), the commit's audit line and deployment."""
        if not self.writer.failed_at:  # after a failed write the tick retries
            self._save_model_files()
        waiting, self._after_announcement = self._after_announcement, []
        for action in waiting:
            self._committed(action)

    def _carry_out(self, action: Carried) -> None:
        if isinstance(action, dm.PublishDeployment):
            self._publish_deployment(action)
        elif isinstance(action, dm.DeploymentDecided):
            verb = "promoted" if action.promoted else "rolled back"
            log.info("candidate %d %s: %s", action.candidate, verb, action.detail)
            self.security.audit("deployment_decision", self.clock(), candidate=action.candidate,
                                incumbent=action.incumbent, promoted=action.promoted,
                                detail=action.detail, **action.figures)
        elif isinstance(action, sm.PublishModel):  # a new version, or the current one again
            size = self._publish(Kind.MODEL, self.topics.model(), action.model, action.model.round)
            self._last_down = (size, self._last_down[1])
            self.trace.mark("model_published", version=action.model.version, bytes=size)
        elif isinstance(action, sm.ModelCommitted):
            if self.config.deploy.policy == "canary":  # the canary judges before it trains on
                self._committed(action)
            else:  # the audit line and the deployed .tflite wait for the next announcement
                self._after_announcement.append(action)
        elif isinstance(action, sm.PublishRound):
            ann = action.announcement
            self.security.on_round(ann.round, self.clock())
            size = self._publish(Kind.ROUND, self.topics.round(), ann, ann.round)
            self._last_down = (self._last_down[0], size)
            self.trace.mark("round_published", round=ann.round, purpose=ann.purpose)
            if ann.purpose == "statistics":
                log.info("statistics round of lineage %s announced (deadline in %.0f s)",
                         ann.lineage, ann.deadline - self.clock())
            elif ann.purpose == "wait":
                pass  # RoundWaiting said why
            else:
                log.info("round %d announced on model version %d (%d gateways ready)", ann.round,
                         ann.model_version, len(self.machine.ready))
        elif isinstance(action, sm.PublishMetrics):
            self._commit_summary(action.summary, action.again)
        elif isinstance(action, sm.UpdateRejected):
            self._count_rejection(action.reason)
            self.security.audit_rejection(action.device, action.reason, action.detail, self.clock())
            log.warning("message from %s for round %d rejected: %s %s",
                        action.device, action.round, action.reason, action.detail)
        elif isinstance(action, sm.UpdateAccepted):
            if self.metrics is not None:
                self.metrics.accepted.inc()
            if action.staleness:
                log.info("update from %s (round %d) folded with staleness %d", action.device,
                         action.round, action.staleness)
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
        elif isinstance(action, sm.LineageStarted):
            log.info("new lineage %s%s", action.lineage,
                     ": a statistics round comes first (fleet scaler)" if action.statistics else "")
            checkpoints.set_aside_models(self.config.state_dir, action.lineage)
            self.security.audit("lineage", self.clock(), lineage=action.lineage)
        elif isinstance(action, sm.ScalerFitted):
            log.info("fleet scaler fitted on %d rows of %d gateways (%s)", action.rows,
                     len(action.devices), ", ".join(action.devices))
        elif isinstance(action, sm.RoundWaiting):
            log.info("round %d waits: %s", action.round, action.reason)
        elif isinstance(action, sm.RunContinued):
            log.info("run continues with round %d (model version %d)", action.round,
                     action.model_version)
        elif isinstance(action, sm.RunFinished):
            self.finished = True
            log.info("run finished after round %d (model version %d)",
                     action.round, action.model_version)

    def _committed(self, action: sm.ModelCommitted) -> None:
        model = self.machine.model
        self.security.audit("model_commit", self.clock(), version=action.version,
                            parent=model.parent_hash.hex(), lineage=self.machine.lineage)
        if self.deploy.sequence >= 0:
            self._apply_deploy(self.deploy.on_commit(action.version, sorted(self.machine.ready),
                                                     self.clock(), self.rng))
            if self.deploy.mode == "latest":
                self._publish_deployed()

    def _commit_summary(self, summary: RoundSummary, again: bool = False) -> None:
        if again and checkpoints.summary_sent(self.config.state_dir, summary.lineage) == summary.round:
            return  # it went out before the restart
        down = sum(self._last_down) * len(summary.participants)
        summary = msgspec.structs.replace(summary, bytes_down=down)
        self._publish(Kind.METRICS, self.topics.metrics(), summary, summary.round)
        checkpoints.mark_summary_sent(self.config.state_dir, summary.lineage, summary.round)
        if again:
            log.info("round %d summary published (it had not gone out before the restart)",
                     summary.round)
            return
        metric = summary.metrics.get(f"eval_{self.machine.metric}")
        log.info("round %d committed: model version %d from %d gateways, %d rows, %s %s, "
                 "%.2f s, %d bytes up", summary.round, summary.model_version,
                 len(summary.participants), summary.num_samples, self.machine.metric,
                 f"{metric:.4g}" if metric is not None else "n/a", summary.wall_s,
                 summary.bytes_up)
        for alert in summary.alerts:  # a capped weight, a gateway closed out, a quarantine...
            log.warning("round %d: %s", summary.round, alert)
        if self.metrics is not None:
            self.metrics.on_summary(summary, self.machine.metric)

    # ---- deployment ----------------------------------------------------------------------

    def _apply_deploy(self, actions: list[dm.DeployAction]) -> None:
        """Deployment records go out after the checkpoint that holds their sequence (a record
        must never be re-used with other content after a restart)."""
        if actions:
            self._apply([sm.SaveCheckpoint(self.machine.checkpoint()), *actions])

    def _publish_deployment(self, action: dm.PublishDeployment) -> None:
        tensors: tuple = ()
        candidate_tensors: tuple = ()
        if action.mode != "latest":
            tensors = self._tensors(action.version)
        if action.candidate >= 0:
            candidate_tensors = self._tensors(action.candidate)
        if (action.mode != "latest" and not tensors) or (action.candidate >= 0 and not candidate_tensors):
            log.error("deployment %d not published: a model file it needs is gone", action.sequence)
            return
        record = Deployment(action.sequence, self.machine.lineage, action.mode, action.version,
                            tensors, action.candidate, candidate_tensors, action.canary,
                            action.reason, self.clock())
        self._publish(Kind.DEPLOYMENT, self.topics.deployment(), record, 0)
        self.security.audit("deployment", self.clock(), sequence=action.sequence, mode=action.mode,
                            version=action.version, candidate=action.candidate,
                            canary=list(action.canary), reason=action.reason)
        log.info("deployment %d: %s%s (%s)", action.sequence,
                 "newest model" if action.mode == "latest" else f"version {action.version}",
                 f", candidate {action.candidate} on {', '.join(action.canary)}" if action.canary else "",
                 action.reason)
        self._publish_deployed()

    def _republish_deployment(self) -> None:
        """After the broker lost its retained messages: the current record again (same
        sequence: gateways that applied it ignore it) and the deployed model."""
        if self.deploy.sequence < 0:
            return
        canary = self.deploy.canary
        self._publish_deployment(dm.PublishDeployment(
            self.deploy.sequence, self.deploy.mode, self.deploy.version,
            canary.candidate if canary else -1, canary.devices if canary else (), "re-published"))

    def _tensors(self, version: int) -> tuple:
        weights = (self.machine.weights if version == self.machine.version
                   else checkpoints.load_model(self.config.state_dir, version))
        if weights is None:
            log.error("model file of version %d is gone; the record carries no weights", version)
            return ()
        return encode_tensors([np.asarray(w, np.float32) for w in weights])

    def _publish_deployed(self) -> None:
        """The deployed model as a float .tflite on raw units, for other plant systems."""
        version = self.machine.version if self.deploy.mode == "latest" else self.deploy.version
        weights = (self.machine.weights if version == self.machine.version
                   else checkpoints.load_model(self.config.state_dir, version))
        if weights is None or self.machine.phase is sm.Phase.STATISTICS:
            return
        try:
            body = dm.deployed_model(self.machine.spec, weights, max(self.deploy.sequence, 0),
                                     self.machine.lineage, version)
        except ImportError:  # the litert extra is not installed on this aggregator
            return
        try:
            self._publish(Kind.DEPLOYED, self.topics.deployed(), body, 0)
        except PayloadTooLargeError as exc:  # not chunked: its readers use no fedgate code
            log.error("deployed model of version %d not published: %s", version, exc)

    # ---- the task state -------------------------------------------------------------------

    def task_state(self, now: float) -> TaskState:
        problem = f"cannot write the state to {self.config.state_dir} (disk full?)" if self._held else ""
        return task_state(self.machine, self.deploy, self.config.rounds.rounds, dict(self.rejected),
                          problem, now)

    def _publish_state(self, now: float) -> None:
        state = self.task_state(now)
        key = msgspec.msgpack.encode(msgspec.structs.replace(state, updated_at=0.0))
        if key == self._state_key and now - self._state_at < STATE_EVERY_S:
            return
        self._state_key, self._state_at = key, now
        self._publish(Kind.STATE, self.topics.state(), state, state.round)
        if self.metrics is not None:
            self.metrics.on_state(state)
            self.metrics.ready.set(len(self.machine.ready))


def _ranges(values: list[int]) -> str:
    if not values:
        return "none"
    out, start, prev = [], values[0], values[0]
    for v in [*values[1:], None]:
        if v is not None and v == prev + 1:
            prev = v
            continue
        out.append(f"{start}-{prev}" if prev != start else str(start))
        if v is not None:
            start = prev = v
    return ", ".join(out)
