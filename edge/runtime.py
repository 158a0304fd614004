"""The gateway agent: the only edge module with clocks, files and the network.

One thread runs the loop: transport events arrive on a queue; messages are decoded and
verified, fed to the pure :class:`~edge.participant.Participant` (rounds, lineages) and
:class:`~edge.deployment.DeploymentFollower` (what runs for inference), and their actions
carried out. Training runs inline (it takes seconds; the transport's network thread keeps
the connection alive meanwhile and queues what arrives).

Data: before each round and every few seconds in between, the gateway reads what its
bridge appended to the sample store (``edge.data``); its status carries the rows no round
has used yet, which the aggregator's schedule can wait for. A gateway with too
few rows says so in its status (``waiting_for_data``, "62 of 500 training rows") and joins
the round in progress as soon as it has enough.

Status: a signed, retained status on ``fg/{fleet}/status/{device}`` says what the gateway
is doing - connection, lineage, the version it runs and the one it trains from, rows held
and new, its last round and holdout evaluation, what it refused. It is published on every
change and at least every ``status_interval_s``; the last will says ``offline``.

Delivery: what the gateway must deliver (updates, statistics, canary reports, telemetry)
goes through :class:`~edge.outbox.Outbox`, which spools it to disk before publishing and
lets go on the broker's PUBACK; the status goes through it too, newest only.

When several round announcements are queued (a gateway back from a partition gets its
persistent session's backlog), only the newest is handled: training once on the current
round, not once per missed round.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import msgspec
import numpy as np

from edge import chunked
from edge import deployment as dm
from edge import participant as pm
from edge import state as saved_state
from edge.config import EdgeConfig
from edge.data import DataSource, LocalData, ScalingError, Snapshot, scaled
from edge.outbox import Outbox
from edge.security import EdgeSecurity
from fedcore.errors import RemoteProtocolError
from fedcore.learning.training import evaluate, train_local
from fedcore.protocol import codec
from fedcore.protocol.chunks import ChunkLimits
from fedcore.protocol.messages import (
    CanaryReport,
    ChunkManifest,
    Deployment,
    GlobalModel,
    Kind,
    ModelSpec,
    RoundAnnouncement,
    Status,
)
from fedcore.protocol.topics import TopicKind, Topics, parse_topic
from fedcore.systemd import SystemdNotifier
from fedcore.trace import NoTrace, Tracer
from fedcore.transport.base import (
    Connected,
    Disconnected,
    MessageReceived,
    PublishAcknowledged,
    Transport,
    TransportEvent,
)
from fedcore.transport.connection import ConnectionWatch

if TYPE_CHECKING:
    from edge.metrics import EdgeMetrics
    from edge.serving import ModelServer

log = logging.getLogger("fedgate.edge")
SOFTWARE = "fedgate-edge/0.2"
TICK_S = 0.2
DATA_POLL_S = 5.0  # how often the gateway looks at its store between rounds
STATUS_GAP_S = 1.0  # status changes go out at most this often; the newest always goes out
STALE_AFTER_S = 600.0  # no new samples for this long: said in the status and the log
# After a reconnect that resumed the session, the broker first resends what it sent on the
# lost connection and was never acknowledged, then the backlog: round announcements wait
# this long so that only the newest is acted on (a partitioned gateway otherwise trained at
# once on an announcement a dozen rounds old, and its update was refused as stale_round).
SETTLE_S = 1.0


class Attack(Protocol):
    """A malicious gateway, for attack experiments only (see edge/attacks.py)."""

    def poison_data(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def poison_weights(self, base: list[np.ndarray], trained: list[np.ndarray]) -> list[np.ndarray]: ...


def signed_status(config: EdgeConfig, security: EdgeSecurity, status: Status, now: float) -> bytes:
    env = codec.make_envelope(Kind.STATUS, config.fleet, config.task, 0, config.device, status, now)
    return codec.encode(security.sign(env))


def offline_status(config: EdgeConfig, security: EdgeSecurity, now: float) -> bytes:
    """The last will (signed once at start-up)."""
    return signed_status(config, security, Status(state="offline", software=SOFTWARE, since=now), now)


class EdgeService:
    def __init__(
        self,
        config: EdgeConfig,
        transport: Transport,
        source: DataSource,
        security: EdgeSecurity,
        encode: pm.EncodeFn = pm.encode_raw,
        attack: Attack | None = None,
        clock: Callable[[], float] = time.time,
        notifier: SystemdNotifier | None = None,
        server: ModelServer | None = None,
        metrics: EdgeMetrics | None = None,
        trace: Tracer | None = None,
        outbox: Outbox | None = None,
    ) -> None:
        self.config = config
        self.transport = transport
        self.source = source
        self.security = security
        self.clock = clock
        self.notifier = notifier or SystemdNotifier(None)
        self.topics = Topics(config.fleet, config.task)
        self.rng = np.random.default_rng(config.seed)
        self.attack = attack
        self.server = server
        self.metrics = metrics
        self.trace = trace or NoTrace()
        # what the gateway publishes; main.py gives it the on-disk spool (edge.outbox)
        self.outbox = outbox or Outbox(transport, None, metrics)
        remembered = saved_state.load(config.state_dir)
        # the gateway's own [privacy] policy and ledger: a damaged ledger stops the start
        ledger = (saved_state.load_ledger(config.state_dir, config.privacy)
                  if config.privacy.active else None)
        self.machine = pm.Participant(config.device, encode=encode, lineage=remembered.lineage,
                                      ledger=ledger)
        self.private = remembered.private
        self.deployer = dm.DeploymentFollower(config.device, remembered.deployment,
                                              remembered.deployment_lineage,
                                              security.limits.max_elements)
        self.events: queue.Queue[TransportEvent] = queue.Queue()
        self.stopping = threading.Event()
        self.rejected: Counter[str] = Counter()
        self.model_chunks = chunked.ModelChunks(config.state_dir / "chunks", ChunkLimits(
            max_message_bytes=security.limits.max_message_bytes, max_assemblies=1,
            max_total_bytes=security.limits.max_message_bytes))
        self._chunk_prefix = self.topics.model_chunks_filter()[:-1]
        self.eval_stats: dict[str, float] = {}
        self.snapshot: Snapshot | None = None
        self.trained_until = remembered.trained_until  # newest row time of the last round trained
        self.last_round, self.last_rows = -1, 0
        self.activity, self.activity_detail = "", ""
        self.connected_since = 0.0
        self.announcement: RoundAnnouncement | None = None  # the newest one received
        self._status_sent = ""
        self._status_at = 0.0
        self._status_due = False  # a change waits for STATUS_GAP_S
        self._status_mono = -math.inf  # monotonic time of the last publish
        self._data_at = 0.0
        self._waiting_logged = 0.0
        self._samples_read, self._samples_at = -1, clock()  # when the store last grew
        self._settle_until = 0.0  # monotonic: round announcements held until then (SETTLE_S)
        self._held_round: MessageReceived | None = None
        self._held_count = 0

    # ---- loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stop(); returns the exit code (0, or the broker watch's 69/77/78)."""
        watch = self._connection_watch()
        self.transport.start(self._enqueue)
        code = 0
        while not self.stopping.is_set():
            self.notifier.watchdog()
            try:
                item = self.events.get(timeout=TICK_S)
            except queue.Empty:
                item = None
            batch = [] if item is None else self._coalesce([item, *self._drain()])
            verdicts = [watch.handle(e, time.monotonic()) for e in batch] or [watch.check(time.monotonic())]
            for verdict in verdicts:
                if verdict is not None:
                    log.log(verdict.level, "%s", verdict.message)
                    if verdict.exit_code is not None:
                        code = verdict.exit_code
            if code:
                break
            for event in batch:
                self._dispatch(event)
            self._tick(self.clock())
        self.notifier.notify("STOPPING=1")
        log.info("stopping (exit %d)", code)
        self.trace.close()
        if code:
            self.transport.stop()
            self.outbox.close()
            if self.metrics is not None:
                self.metrics.close()
            return code
        self._goodbye()
        return 0

    def _enqueue(self, event: TransportEvent) -> None:
        """On the transport's thread: queue the event, unless it is a chunk beyond the bound."""
        if (isinstance(event, MessageReceived) and event.topic.startswith(self._chunk_prefix)
                and not self.model_chunks.admit(len(event.payload))):
            return  # retained on the broker: asked for again once the queue has drained
        self.events.put(event)

    def _connection_watch(self) -> ConnectionWatch:
        t, device = self.topics, self.config.device
        timeout = self.config.broker.startup_timeout_s or None
        return ConnectionWatch(self.config.broker.url, timeout, started_at=time.monotonic(),
                               identity=device, own_topics=(t.status(device), t.update(device),
                                                            t.update_chunk(device), t.round(), t.model(),
                                                            t.model_chunks_filter(), t.deployment()))

    def _drain(self) -> list[TransportEvent]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def _coalesce(self, events: list[TransportEvent]) -> list[TransportEvent]:
        """Drop every queued round announcement but the newest (a session's backlog)."""
        rounds = [i for i, e in enumerate(events) if isinstance(e, MessageReceived)
                  and e.topic == self.topics.round()]
        drop = set(rounds[:-1])
        if drop:
            log.info("skipped %d queued round announcements (only the newest counts)", len(drop))
        return [e for i, e in enumerate(events) if i not in drop]

    def _dispatch(self, item: TransportEvent) -> None:
        if isinstance(item, Connected):
            self._on_connected(item)
        elif isinstance(item, Disconnected):  # the connection watch logs it
            self.outbox.on_disconnected()
            if self.metrics is not None:
                self.metrics.connected.set(0)
        elif isinstance(item, MessageReceived):
            if item.topic == self.topics.round() and time.monotonic() < self._settle_until:
                self._held_round = item  # the newest of the backlog wins
                self._held_count += 1
                return
            self._on_message(item)
        elif isinstance(item, PublishAcknowledged):
            self.outbox.on_acknowledged(item)

    def _tick(self, now: float) -> None:
        if self._held_round is not None and time.monotonic() >= self._settle_until:
            held, self._held_round = self._held_round, None
            if self._held_count > 1:
                log.info("skipped %d round announcements resent after the reconnect (only the "
                         "newest counts)", self._held_count - 1)
            self._held_count = 0
            self._on_message(held)
        waiting = self.activity == "waiting_for_data"
        if now - self._data_at >= DATA_POLL_S:
            self._refresh(now)  # new rows reach the status (the aggregator's schedule counts them)
            if waiting and self.activity != "waiting_for_data" and self.announcement is not None:
                self._apply(self.machine.handle(pm.RoundAnnounced(now, self.announcement)))
        if self.model_chunks.stalled(now):
            log.info("chunked model incomplete: asking the broker for its chunks again")
            self.transport.subscribe(self.topics.model_chunks_filter(), qos=1)  # retained again
        if now - self._status_at >= self.config.status_interval_s:
            self._publish_status(force=True)
        elif self._status_due:
            self._publish_status()

    def stop(self) -> None:
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stop())

    def _goodbye(self) -> None:
        try:
            status = msgspec.structs.replace(self._status("online"), state="offline",
                                             since=self.clock())
            self.transport.publish(self.topics.status(self.config.device),
                                   signed_status(self.config, self.security, status, self.clock()),
                                   qos=1, retain=True, wait=2.0)
        except Exception as exc:  # the broker may already be gone; the will covers it
            log.info("could not publish offline status: %s", exc)
        self.transport.stop()
        self.outbox.close()
        if self.metrics is not None:
            self.metrics.close()

    # ---- data and status ---------------------------------------------------------------------

    def _refresh(self, now: float) -> Snapshot:
        self._data_at = now
        snap = self.source.snapshot(self.trained_until)
        self.snapshot = snap
        if not snap.ready:
            if self.activity != "waiting_for_data" or now - self._waiting_logged >= 60:
                log.info("waiting for data: %s", snap.waiting)
                self._waiting_logged = now
            self._set_activity("waiting_for_data", snap.waiting)
        elif self.activity in ("", "waiting_for_data"):
            log.info("enough data: %d training rows (%d holdout); ready to take part in rounds",
                     len(snap.x_train), len(snap.x_holdout))
            self._set_activity("ready")
        self._check_stale(now)
        if self.metrics is not None:
            self.metrics.rows.set(snap.rows)
            self.metrics.rows_new.set(snap.rows_new)
            self.metrics.waiting.set(0 if snap.ready else 1)
        self._publish_status()
        return snap

    def _check_stale(self, now: float) -> None:
        """A bridge that stopped writing: say so (the gateway keeps its rows and takes part)."""
        read = getattr(self.source, "samples_read", None)
        if read is None:
            return  # a data set does not grow
        if read != self._samples_read:
            if self.activity_detail.startswith("no new samples"):
                log.info("samples arrive again")
                self._set_activity(self.activity)
            self._samples_read, self._samples_at = read, now
        elif now - self._samples_at >= STALE_AFTER_S and self.activity != "waiting_for_data" \
                and not self.activity_detail.startswith("no new samples"):
            since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self._samples_at))
            log.warning("no new samples from the bridge since %s: is it running?", since)
            self._set_activity(self.activity or "ready", f"no new samples since {since} (is the bridge running?)")

    def _set_activity(self, activity: str, detail: str = "") -> None:
        self.activity, self.activity_detail = activity, detail

    def _status(self, state: str) -> Status:
        snap = self.snapshot
        running = self._running_version()
        return Status(
            state=state, software=SOFTWARE, model_version=running, lineage=self.machine.lineage,
            trained_version=self.machine.version, since=self.connected_since,
            activity=self.activity, activity_detail=self.activity_detail,
            rows=snap.rows if snap else 0, rows_new=snap.rows_new if snap else 0,
            rows_needed=snap.rows_needed if snap else 0, last_round=self.last_round,
            last_rows=self.last_rows, last_eval={} if self._private() else dict(self.eval_stats),
            deployment=self.deployer.sequence, rejected=dict(self.rejected),
        )

    def _private(self) -> bool:
        """Under DP clear evaluation figures would leak around the noise: they stay here.
        Until a round is announced, the last one's setting holds (it is remembered)."""
        ann = self.announcement
        if ann is None:
            return self.private
        private = ann.pipeline.noise_multiplier > 0 or ann.train.dp_noise > 0
        if private != self.private:
            self.private = private
            self._remember()
        return private

    def _publish_status(self, force: bool = False) -> None:
        """The retained status, when it changed. A round changes it twice or more (training,
        then the update's figures); within STATUS_GAP_S of the last one a change waits for
        the next tick, so a fast round costs one status, not several, and the newest state
        always goes out."""
        if not self.connected_since:
            return
        mono = time.monotonic()  # a wall clock stepped back (NTP) must not hold changes
        if not force and mono - self._status_mono < STATUS_GAP_S:
            self._status_due = True
            return
        self._status_due = False
        status = self._status("online")
        key = msgspec.json.encode(status).decode()
        if not force and key == self._status_sent:
            return
        self._status_sent, self._status_at, self._status_mono = key, self.clock(), mono
        self.outbox.publish_latest(self.topics.status(self.config.device),
                                   signed_status(self.config, self.security, status, self.clock()))

    def _save_ledger(self) -> None:
        if self.machine.ledger is None:
            return
        try:
            saved_state.save_ledger(self.config.state_dir, self.machine.ledger)
        except OSError as exc:
            # the charge stays in memory and is written with the next update
            log.error("cannot save the privacy ledger in %s: %s", self.config.state_dir,
                      exc.strerror or exc)

    def _remember(self) -> None:
        state = saved_state.EdgeState(self.machine.lineage, self.deployer.sequence,
                                      self.deployer.lineage, self.trained_until, self.private)
        try:
            saved_state.save(self.config.state_dir, state)
        except OSError as exc:
            log.error("cannot save %s/%s: %s (lineage and deployment are kept in memory)",
                      self.config.state_dir, saved_state.FILE, exc.strerror or exc)

    # ---- inbound -----------------------------------------------------------------------------

    def _on_connected(self, event: Connected) -> None:
        # the round first: whether rounds are private is known before the model is evaluated
        for topic in (self.topics.round(), self.topics.model(), self.topics.model_chunks_filter(),
                      self.topics.deployment()):
            self.transport.subscribe(topic, qos=1)
        self.connected_since = self.clock()
        if self.metrics is not None:
            self.metrics.connected.set(1)
        log.debug("session present: %s", event.session_present)  # the connection watch logs the connect
        if event.session_present:
            self._settle_until = time.monotonic() + SETTLE_S
        self._refresh(self.clock())
        self._publish_status(force=True)
        for whole in self.model_chunks.take_restored():  # assembled before a restart
            self._on_message(MessageReceived(self.topics.model(), whole, True), assembled=True)
        self.outbox.on_connected()  # the status first, then what is spooled, oldest first
        self.notifier.notify(f"READY=1\nSTATUS=connected; {self.activity or 'ready'} "
                             f"{self.activity_detail}".rstrip())

    def _on_message(self, msg: MessageReceived, assembled: bool = False) -> None:
        now = self.clock()
        try:
            parsed = parse_topic(msg.topic)
            if parsed.kind is TopicKind.MODEL_CHUNK:
                whole = self.model_chunks.on_chunk(msg.payload, now)
                if whole is not None:  # checked from here on as if it had come in one piece
                    self._on_message(MessageReceived(self.topics.model(), whole, msg.retained, msg.arrived),
                                     assembled=True)
            elif parsed.kind is TopicKind.MODEL:
                # a manifest, but never one inside an assembled message
                kinds = (Kind.MODEL,) if assembled else (Kind.MODEL, Kind.MANIFEST)
                env = self.security.open_from_aggregator(msg.payload, kinds)
                if env.kind == Kind.MANIFEST:
                    self.model_chunks.on_manifest(codec.decode_body(env, ChunkManifest), now)
                    return
                model = codec.decode_body(env, GlobalModel)
                self.trace.mark("model_received", version=model.version, sent=env.timestamp,
                                arrived=msg.arrived, start=now)
                self._apply(self.machine.handle(pm.ModelReceived(now, model)))
            elif parsed.kind is TopicKind.ROUND:
                env = self.security.open_from_aggregator(msg.payload, Kind.ROUND)
                ann = codec.decode_body(env, RoundAnnouncement)
                self.trace.mark("announcement_received", round=ann.round, sent=env.timestamp,
                                arrived=msg.arrived, start=now)
                self.announcement = ann
                self._apply(self.machine.handle(pm.RoundAnnounced(now, ann)))
            elif parsed.kind is TopicKind.DEPLOYMENT:
                env = self.security.open_from_aggregator(msg.payload, Kind.DEPLOYMENT)
                record = codec.decode_body(env, Deployment)
                self._on_deployment(record)
        except RemoteProtocolError as exc:
            self._reject(exc.reason)
            log.warning("rejected message on %s: %s", msg.topic, exc)
            if exc.reason == "too_large" and msg.topic == self.topics.model():
                # said in the status, so the aggregator stops waiting for this gateway
                log.error("the fleet's model is larger than this gateway takes in (%s): raise "
                          "[broker] max_message in %s", exc.detail, self.config.file)
                self._set_activity("incompatible", f"model too large for broker.max_message: {exc.detail}")
                self._publish_status()

    def _reject(self, reason: str) -> None:
        self.rejected[reason] += 1
        if self.metrics is not None:
            self.metrics.rejected.inc(reason=reason)

    # ---- participant actions -----------------------------------------------------------------

    def _apply(self, actions: list[pm.Action]) -> None:
        for action in actions:
            if isinstance(action, pm.LineageChanged):
                log.info("following lineage %s (was %s)", action.new, action.old or "none")
                self.trained_until, self.last_round, self.last_rows = -math.inf, -1, 0
                self.eval_stats = {}
                if self.server is not None:
                    self.server.reset()  # versions count again in the new lineage
                self._remember()
            elif isinstance(action, pm.InstallModel):
                self._install(action)
            elif isinstance(action, pm.StartTraining):
                before = self.trained_until
                self._apply(self.machine.handle(self._train(action)))
                if self.trained_until != before:
                    self._remember()  # once the update is out: a restart must not count these rows as new
            elif isinstance(action, pm.PublishUpdate):
                if not action.resend:
                    self._save_ledger()  # charged before it goes out
                self._send_update(action)
            elif isinstance(action, pm.PolicyMet):
                log.info("round %d complies with [privacy] again: taking part", action.round)
                if self.activity == "refusing":
                    self._set_activity("ready")
            elif isinstance(action, pm.SendStatistics):
                self._send_statistics(action)
            elif isinstance(action, pm.ModelRefused):
                self._reject(action.reason)
                log.warning("model version %d refused: %s", action.version, action.reason)
            elif isinstance(action, pm.SatOut):
                if self.metrics is not None:
                    self.metrics.sat_out.inc(reason=action.reason.split(":")[0])
                if action.reason.startswith(("privacy_policy", "privacy_budget_spent")):
                    # a policy the aggregator cannot change: the operator has to see it
                    log.warning("round %d: refused by this gateway's privacy policy (%s, in %s)",
                                action.round, action.reason, self.config.file)
                    self._set_activity("refusing", action.reason)
                else:
                    log.info("round %d: sitting out (%s)", action.round, action.reason)
        self._publish_status()

    def _send_update(self, action: pm.PublishUpdate) -> None:
        env = codec.make_envelope(Kind.UPDATE, self.config.fleet, self.config.task,
                                  action.round, self.config.device, action.update,
                                  self.clock(), message_id=action.message_id)
        payload = codec.encode(self.security.sign(env))
        self._to_aggregator(Kind.UPDATE, payload, action.round, env.message_id, resend=action.resend)
        self.trace.mark("update_published", round=action.round, bytes=len(payload))
        if action.resend:
            log.info("round %d: update re-sent (%d bytes)", action.round, len(payload))
            return
        self.last_round = action.round
        if self.metrics is not None:
            self.metrics.updates.inc()
            self.metrics.last_round.set(action.round)
        log.info("round %d: update sent (%d bytes, %d training rows)%s", action.round, len(payload),
                 action.update.num_samples,
                 "" if self.outbox.connected else "; spooled until the broker is back")

    def _send_statistics(self, action: pm.SendStatistics) -> None:
        snap = self._refresh(self.clock())
        if not snap.ready:
            log.info("statistics round of lineage %s: not answering yet (%s)", action.lineage,
                     snap.waiting)
            return
        body = self.source.statistics(snap, action.lineage)
        env = codec.make_envelope(Kind.STATS, self.config.fleet, self.config.task, action.round,
                                  self.config.device, body, self.clock())
        self._to_aggregator(Kind.STATS, codec.encode(self.security.sign(env)), action.round, env.message_id)
        log.info("statistics of %d training rows sent for lineage %s", body.count, action.lineage)

    def _to_aggregator(self, kind: Kind, payload: bytes, round_: int, message_id: str,
                       resend: bool = False) -> None:
        """Spool and publish one signed message on this gateway's update topic: whole when it
        fits the broker's limit, else as a signed manifest and chunks (edge.chunked), every
        part under the message's id (edge.outbox)."""
        def seal(manifest: ChunkManifest) -> bytes:
            env = codec.make_envelope(Kind.MANIFEST, self.config.fleet, self.config.task, round_,
                                      self.config.device, manifest, self.clock())
            return codec.encode(self.security.sign(env))

        pubs = chunked.to_aggregator(payload, kind, self.topics, self.config.device, self.transport, seal)
        for pub in pubs:
            self.outbox.publish(pub.topic, pub.payload, kind=kind, round=round_, message_id=message_id,
                                resend=resend)
        if len(pubs) > 1:
            log.info("%s of %d bytes sent as %d chunks", kind.value, len(payload), len(pubs) - 1)

    def _scaled(self, spec: ModelSpec) -> LocalData | None:
        snap = self.snapshot or self._refresh(self.clock())
        try:
            data = scaled(snap, spec)
            if self.activity == "incompatible":
                log.info("the fleet's model fits this gateway's task again")
                self._set_activity("ready")
            return data
        except ScalingError as exc:
            if self.activity != "incompatible":
                log.error("cannot use the fleet's model: %s", exc)
            self._set_activity("incompatible", str(exc))
            return None

    def _install(self, action: pm.InstallModel) -> None:
        self.trace.mark("model_installed", version=action.model.version)
        spec = action.model.spec
        self.eval_stats = {}
        data = self._scaled(spec)
        if data is not None and data.y_test is not None and len(data.x_test):
            scores = evaluate(spec, action.weights, data.x_test, data.y_test,
                              target_scale=data.target_scale)
            self.eval_stats = {f"eval_{k}": float(v) for k, v in scores.items()}
            if self.metrics is not None:
                for k, v in scores.items():
                    self.metrics.holdout.set(v, metric=k)
        elif data is not None and spec.kind == "autoencoder" and len(data.x_test):
            scores = evaluate(spec, action.weights, data.x_test, None)
            self.eval_stats = {f"eval_{k}": float(v) for k, v in scores.items()}
        self.trace.mark("evaluated", version=action.model.version)
        if self.metrics is not None:
            self.metrics.trained_version.set(action.model.version)
        summary = ", ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in self.eval_stats.items()
                            if k in ("eval_rmse", "eval_mae", "eval_accuracy", "eval_f1", "eval_mse"))
        log.info("model version %d installed%s", action.model.version,
                 f"; holdout {summary}" if summary else "")
        running = self.deployer.running
        if running.weights is None:
            self._serve(action.model.version, action.weights)
        elif self.deployer.lineage == self.machine.lineage and self.server is not None \
                and self.server.loaded != (self.machine.lineage, running.version):
            self._serve(running.version, running.weights)  # a record that came before its model

    def _train(self, action: pm.StartTraining) -> pm.TrainingFinished | pm.TrainingFailed:
        model = self.machine.model
        assert model is not None
        spec = model.spec
        snap = self._refresh(self.clock())
        if not snap.ready:
            return pm.TrainingFailed(self.clock(), action.round, f"waiting for data: {snap.waiting}")
        data = self._scaled(spec)
        if data is None or data.y_train is None and spec.kind != "autoencoder":
            return pm.TrainingFailed(self.clock(), action.round, f"incompatible: {self.activity_detail}")
        x, y = data.x_train, data.y_train
        if self.attack is not None and y is not None:
            x, y = self.attack.poison_data(spec, x, y)
        self._set_activity("training", f"round {action.round}")
        self.trace.mark("train_start", round=action.round)
        started = time.perf_counter()
        try:
            weights, result = train_local(spec, action.weights, x, y, action.train, self.rng)
        except ValueError as exc:  # a config it cannot run
            log.error("round %d: local training failed: %s", action.round, exc)
            self._set_activity("ready")
            return pm.TrainingFailed(self.clock(), action.round, f"training failed: {exc}")
        finally:
            seconds = time.perf_counter() - started
            self.trace.mark("train_end", round=action.round)
        self._set_activity("ready")
        if not np.isfinite(result.loss) or not all(np.isfinite(w).all() for w in weights):
            log.error("round %d: local training diverged (loss %s); sitting this round out",
                      action.round, result.loss)
            return pm.TrainingFailed(self.clock(), action.round, "training diverged")
        if self.attack is not None:
            weights = self.attack.poison_weights(action.weights, weights)
        self.trained_until = max(self.trained_until, snap.newest_time)
        self.snapshot = dataclasses.replace(snap, rows_new=0)  # all of them are used now
        self.last_rows = result.num_samples
        if self.metrics is not None:
            self.metrics.train_rows.set(result.num_samples)
            self.metrics.train_seconds.set(seconds)
        log.info("round %d: trained on version %d with %d rows (%d new) in %.2f s, loss %.4g",
                 action.round, action.base_version, result.num_samples, snap.rows_new, seconds,
                 result.loss)
        stats = dict(self.eval_stats)
        stats["train_s"] = seconds
        stats["rows_new"] = float(snap.rows_new)
        return pm.TrainingFinished(self.clock(), action.round, action.base_version, weights,
                                   result.num_samples, result.loss, stats, action.lineage)

    # ---- deployment and inference ------------------------------------------------------------

    def _on_deployment(self, record: Deployment) -> None:
        actions = self.deployer.on_record(record, self.machine.lineage)
        for action in actions:
            if isinstance(action, dm.DeploymentRefused):
                self._reject(action.reason)
                log.warning("deployment record %d refused: %s", action.sequence, action.reason)
            elif isinstance(action, dm.RunModel):
                running = action.running
                log.info("deployment %d (%s): running %s", record.sequence, record.mode,
                         "the newest model" if running.weights is None
                         else f"version {running.version} ({running.role})")
                if running.weights is not None and record.lineage == self.machine.lineage:
                    self._serve(running.version, running.weights)
                elif self.machine.weights is not None:
                    self._serve(self.machine.version, self.machine.weights)
            elif isinstance(action, dm.EvaluateCanary):
                self._canary_report(action)
        if actions and not isinstance(actions[0], dm.DeploymentRefused):
            self._remember()
        self._publish_status()

    def _running_version(self) -> int:
        running = self.deployer.running
        return self.machine.version if running.weights is None else running.version

    def _canary_report(self, action: dm.EvaluateCanary) -> None:
        model = self.machine.model
        data = self._scaled(model.spec) if model is not None else None
        if model is None or data is None or len(data.x_test) == 0:
            # say so at once (an empty report): the aggregator need not wait for its timeout
            log.warning("canary of version %d: no holdout rows to judge it on", action.candidate)
            self._set_activity(self.activity or "ready",
                               f"canary of version {action.candidate}: no holdout rows to judge it")
            self._send_canary(CanaryReport(action.sequence, action.candidate, action.incumbent))
            return
        spec = model.spec
        try:
            cand = evaluate(spec, action.candidate_weights, data.x_test, data.y_test,
                            target_scale=data.target_scale)
            inc = evaluate(spec, action.incumbent_weights, data.x_test, data.y_test,
                           target_scale=data.target_scale)
        except ValueError as exc:
            log.warning("canary of version %d: cannot evaluate: %s", action.candidate, exc)
            return
        self._send_canary(CanaryReport(action.sequence, action.candidate, action.incumbent,
                                       {k: float(v) for k, v in cand.items()},
                                       {k: float(v) for k, v in inc.items()}, len(data.x_test)))
        log.info("canary report: version %d %s vs version %d %s on %d holdout rows",
                 action.candidate, _brief(cand), action.incumbent, _brief(inc), len(data.x_test))

    def _send_canary(self, body: CanaryReport) -> None:
        env = codec.make_envelope(Kind.CANARY, self.config.fleet, self.config.task, 0,
                                  self.config.device, body, self.clock())
        self.outbox.publish(self.topics.update(self.config.device),
                            codec.encode(self.security.sign(env)), kind=Kind.CANARY, round=0,
                            message_id=env.message_id)

    def _serve(self, version: int, weights: list[np.ndarray]) -> None:
        """Run ``version`` in LiteRT (when inference is on) and publish its scores."""
        if self.metrics is not None:
            self.metrics.model_version.set(version)
        model = self.machine.model
        if self.server is None or model is None:
            return
        data = self._scaled(model.spec)
        if data is None or len(data.x_train) == 0:
            return
        try:
            if (self.machine.lineage, version) != self.server.loaded:
                self.server.load(model.spec, self.machine.lineage, version, weights, data.x_train,
                                 data.y_train, data.target_scale)
            body = self.server.score(data.x_test, data.y_test, data.target_scale)
        except (RemoteProtocolError, ValueError, RuntimeError) as exc:
            log.error("model version %d cannot run in LiteRT: %s", version, exc)
            return
        self.trace.mark("served", version=version)
        if body is None:
            return
        env = codec.make_envelope(Kind.TELEMETRY, self.config.fleet, self.config.task,
                                  model.round, self.config.device, body, self.clock())
        self.outbox.publish(self.topics.telemetry(self.config.device),
                            codec.encode(self.security.sign(env)), kind=Kind.TELEMETRY,
                            round=model.round, message_id=env.message_id)
        log.info("model version %d running in LiteRT (int8, %d bytes): %s", version,
                 self.server.size, {k: round(v, 3) for k, v in body.values.items()})


def _brief(metrics: dict[str, float]) -> str:
    for key in ("rmse", "accuracy", "mse", "loss"):
        if key in metrics:
            return f"{key} {metrics[key]:.4g}"
    return ""
