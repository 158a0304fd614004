"""The aggregator's round state machine: announce -> collect -> aggregate -> commit.

Theory of operation
-------------------
The machine is pure: ``handle(event) -> list[action]``. Events carry ``now`` (unix seconds);
the runtime feeds transport messages and timer ticks in and carries the actions out
(publish, checkpoint, log). Randomness (client sampling) comes from the ``random.Random``
given at construction.

Rules:

0. **A lineage** is the life of one aggregator state. ``Started`` without a restored state
   names a new lineage (``fedcore.protocol.lineage``: gateways follow it, and refuse older
   ones). With ``scaling = "federated"`` and no fleet scaler yet, it opens with a
   *statistics round* (round 0, ``purpose = "statistics"``): the ready gateways answer with
   counts, sums and centred sums of squares (``StatsReceived``); with ``min_participants`` answers,
   once every ready gateway answered or at the deadline, the fleet scaler goes into the
   spec (``aggregator.statistics``) and model version 0 is published. A restored state
   whose model differs from the configured one raises :class:`IncompatibleState`.
1. **Next round** (after ``Started``, the statistics round or a commit): the run finishes
   after ``rounds`` committed rounds (``rounds = 0``: never); otherwise the schedule
   (``aggregator.schedule``: interval, time windows, fleet-wide new rows) either lets round
   ``r`` start or the machine *waits* (``RoundWaiting``, re-checked on ``Tick`` and on the
   gateways' status); waiting replaces the retained announcement with one of purpose
   ``"wait"``, so a gateway that reconnects meanwhile does not answer the committed round. A checkpoint is taken *before* each announcement so that a restarted
   aggregator re-announces the same round (gateways that already trained resend their
   cached update; duplicates are dropped by message id). A finished run restarted with more
   rounds continues (``RunContinued``).
2. ``UpdateReceived`` while collecting round ``r`` is accepted once per gateway if it is for
   round ``r``, built on version ``v``, from a selected gateway, claims a sane sample count
   and finite statistics, decodes within bounds, has the expected shapes, is finite and
   within the norm bound. Anything else is an ``UpdateRejected`` action with a stable
   reason (``late``, ``wrong_round``, ``duplicate``, ``duplicate_device``, ``stale_base``,
   ``not_selected``, ``bad_samples``, ``bad_stats``, ``norm_too_large`` or the decoder's
   reason) - counted, never an exception.
3. The round closes as soon as every expected gateway (selected, online and *ready*: a
   gateway whose status says it is waiting for data is not waited for) has answered, with
   at least ``min_participants`` updates; or at the deadline with at least
   ``min_participants`` (less the quarantined or budget-spent gateways, which can no longer
   count). A deadline with fewer is *quorum missed*: the deadline is extended and the round
   re-announced (an event in the summary, not an error). A gateway that is online but
   silent (its link is gone and the broker has not noticed yet: that takes 1.5x its
   keepalive) costs a round the *straggler window*, not the deadline: once at least half
   the expected gateways and ``min_participants`` have answered, the rest get
   ``straggler_factor`` times as long again as that took (at least ``straggler_min_s``);
   then the round closes without them, with an alert naming them. An expected gateway that
   goes offline mid-round is awaited ``straggler_min_s`` (a broker that stops publishes every
   last will, and the gateways return with their updates seconds later). Who is online and ready is in
   the checkpoint: a restarted aggregator waits for the same gateways (their retained
   status or resent update may come in any order) and forgets one that says nothing within
   ``CONFIRM_S`` of the restart.
4. Aggregate: fuse the deltas (the configured rule), apply the server optimizer, bump the
   version, chain the parent hash, checkpoint, publish the model (retained), the next
   announcement (rule 1) and the round summary (with each participant's own holdout
   figures). History is kept for ``keep_history`` rounds. ``max_sample_share`` caps any
   gateway's fusion weight at that share of the round (``robust.cap_shares``).
5. Downlink (``RoundConfig.downlink``): the model travels as fp32, int8 or an int8 delta
   on the previous version; ``aggregator.downlink`` keeps what gateways hold (the fused
   delta is relative to it) and re-sends the current version in full when a gateway comes
   online while the retained model is a delta.
6. Buffered mode (``RoundConfig.mode == "buffered"``): a round is one buffer. Rule 2's round
   and base checks give way to ``aggregator.buffered`` (any base within ``max_staleness``;
   ``too_stale``, ``future_base``), a gateway's second update goes into the next buffer,
   rule 3 closes the buffer at ``buffer_size`` updates, and rule 4 scales each delta by its
   staleness weight before fusion. The announcement says ``mode = "buffered"``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import msgspec
import numpy as np

from aggregator import buffered as buf
from aggregator import reputation as rep
from aggregator import robust
from aggregator.downlink import Downlink
from aggregator.model_change import IncompatibleState, architecture, changed
from aggregator.robust import cap_shares, outlier_distances
from aggregator.round_events import (  # re-exported: callers use rounds.Started etc.
    Action,
    BrokerSessionLost,
    Checkpoint,
    DeviceOffline,
    DeviceOnline,
    Event,
    GatewayQuarantined,
    GatewayReleased,
    LineageStarted,
    ModelCommitted,
    PublishMetrics,
    PublishModel,
    PublishRound,
    QuorumMissed,
    RoundWaiting,
    RunContinued,
    RunFinished,
    SaveCheckpoint,
    ScalerFitted,
    Started,
    StatsReceived,
    Tick,
    UpdateAccepted,
    UpdateReceived,
    UpdateRejected,
)
from aggregator.schedule import Schedule, next_round
from aggregator.server_optim import (
    ServerOptimizerConfig,
    ServerOptimizerState,
    apply_server_update,
)
from aggregator.statistics import check_stats, fleet_scaler
from aggregator.summary import KEPT_STATS, round_summary
from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.learning.metrics import holdout_metric
from fedcore.learning.params import Params, Shapes, l2_norm, shapes_of
from fedcore.pipeline import decode_update
from fedcore.privacy.dpsgd import dp_steps, sampling_rate
from fedcore.protocol.codec import body_hash
from fedcore.protocol.lineage import new_lineage
from fedcore.protocol.messages import (
    DataStats,
    EncodedDelta,
    GlobalModel,
    ModelSpec,
    ModelUpdate,
    PipelineConfig,
    RoundAnnouncement,
    RoundSummary,
    TrainConfig,
)

__all__ = [
    "Action", "BrokerSessionLost", "Checkpoint", "DeviceOffline", "DeviceOnline", "Event",
    "GatewayQuarantined", "GatewayReleased", "LineageStarted", "ModelCommitted", "PublishMetrics",
    "PublishModel",
    "PublishRound", "QuorumMissed", "RoundWaiting", "RunContinued", "RunFinished",
    "SaveCheckpoint", "ScalerFitted", "Started", "StatsReceived", "Tick", "UpdateAccepted",
    "UpdateReceived", "UpdateRejected", "RoundStateMachine", "RoundConfig", "Phase",
    "IncompatibleState", "KEPT_STATS",
]

MAX_SAMPLES = 10**9  # a gateway claiming more rows is lying (FedAvg weighs by this count)
CONFIRM_S = 10.0  # a gateway restored as online that says nothing this long after a restart is not
MAX_STATS = 32  # statistics per update (evaluation figures, timings)
MAX_STAT_KEY = 64

# (updates, sample counts, previous global weights) -> fused delta, per-client info
FuseFn = Callable[[list[Params], list[float], Params], Params]
DecodeFn = Callable[[EncodedDelta, Shapes], Params]


def fedavg(updates: list[Params], weights: list[float], _global: Params) -> Params:
    return robust.fedavg(updates, weights)


class Ledger(Protocol):
    """Per-gateway privacy accounting (``aggregator.privacy.PrivacyLedger``)."""

    def check(self, device: str, noise_multiplier: float, sampling_rate: float = 1.0,
              steps: int = 1) -> Any: ...

    def record(self, device: str, noise_multiplier: float, sampling_rate: float = 1.0,
               steps: int = 1) -> float: ...

    def spent(self) -> dict[str, float]: ...

    def to_dict(self) -> dict[str, Any]: ...


class Phase(Enum):
    IDLE = "idle"
    STATISTICS = "statistics"  # the lineage's statistics round: collecting DataStats
    COLLECTING = "collecting"  # a training round: collecting updates
    WAITING = "waiting"  # between rounds, until the schedule allows the next one
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RoundConfig:
    rounds: int = 10  # 0 = until stopped
    min_participants: int = 1
    round_timeout_s: float = 60.0
    fraction: float = 1.0  # share of online gateways selected each round
    max_update_norm: float = 0.0  # 0 = no bound (pre-fusion validation)
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    server: ServerOptimizerConfig = ServerOptimizerConfig()
    reputation: rep.ReputationConfig | None = None  # None = no reputation, no quarantine
    downlink: str = "fp32"  # how the model travels: fp32 | int8 | delta (aggregator.downlink)
    downlink_full_every: int = 10  # delta: a full model every N versions (0 = only on re-sync)
    schedule: Schedule = Schedule()
    scaling: str = "none"  # "federated": a lineage starts with a statistics round
    keep_history: int = 1000  # round summaries kept (history.jsonl beside the checkpoint)
    max_sample_share: float = 0.0  # no gateway's fusion weight above this share (0 = off)
    straggler_factor: float = 2.0  # wait for the rest this many times the time to half (0 = off)
    straggler_min_s: float = 5.0  # ... and at least this long
    mode: str = "sync"  # "buffered": FedBuff-style asynchronous rounds (aggregator.buffered)
    buffered: buf.BufferedConfig = buf.BufferedConfig()


@dataclass
class _Received:
    update: ModelUpdate
    delta: Params
    wire_bytes: int
    staleness: int = 0  # buffered mode: versions between its base and the current model


class RoundStateMachine:
    """Pure aggregator round logic. See the module docstring for the rules."""

    def __init__(
        self,
        config: RoundConfig,
        spec: ModelSpec,
        initial_weights: Params,
        rng: random.Random,
        fuse: FuseFn = fedavg,
        decode: DecodeFn = decode_update,
        ledger: Ledger | None = None,
    ) -> None:
        self.config = config
        self.spec = spec
        self.rng = rng
        self.fuse = fuse
        self.decode = decode
        self.ledger = ledger
        self.alerts: list[str] = []  # raised during the current round, go into its summary
        self.weights: Params = [np.asarray(w, np.float32) for w in initial_weights]
        self.shapes = shapes_of(self.weights)
        self.optimizer_state = ServerOptimizerState()
        self.phase = Phase.IDLE
        self.lineage = ""
        self.round = 1
        self.version = 0
        self.parent_hash = b""
        self.online: set[str] = set()
        self.unready: set[str] = set()  # online, but waiting for data or incompatible
        self.rows_new: dict[str, int] = {}
        self.downlink = Downlink(config.downlink, config.downlink_full_every)
        self.model = self._make_model()
        self.known: set[str] = set()  # every gateway seen online since start
        self.selected: tuple[str, ...] = ()
        self.deadline = 0.0
        self.announced_at = 0.0
        self.half_at: float | None = None  # when half the round's expected gateways had answered
        self.left: dict[str, float] = {}  # expected, went offline mid-round at, not back (rule 3)
        self.last_start = 0.0
        self.waiting_for = ""
        self.next_check = 0.0
        self.attempt = 0
        self.received: dict[str, _Received] = {}
        self.deferred: dict[str, _Received] = {}  # buffered: the next buffer's first updates
        self.stats: dict[str, DataStats] = {}
        self.refused: set[str] = set()  # gateways whose update this round failed validation
        self.seen_ids: dict[str, int] = {}  # message id -> round, for duplicate detection
        self.rejected: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []  # an entry is never changed once appended
        self.history_count = 0  # entries ever appended (the journal numbers them)
        self.excluded: set[str] = set()  # out of privacy budget
        self.reputation = rep.ReputationState()
        self.metric, self.metric_higher_is_better = holdout_metric(spec.kind, spec.task)
        self._resume_round = False
        # restored as online from the checkpoint, not yet confirmed by a status since the
        # start (its retained status arrives at once on subscribing)
        self.unconfirmed: set[str] = set()
        self.started_at = 0.0
        self.last_summary: RoundSummary | None = None  # checkpointed: re-published at start

    # ---- public API --------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.phase is Phase.FINISHED:
            if isinstance(event, UpdateReceived):
                return [self._reject(event.device, event.update.round, "finished", "run is over")]
            if isinstance(event, Started):
                return self._on_started(event)
            if isinstance(event, DeviceOnline):  # who is there, for the operator
                self.online.add(event.device)
            elif isinstance(event, DeviceOffline):
                self.online.discard(event.device)
            if isinstance(event, DeviceOnline | DeviceOffline):
                self.unconfirmed.discard(event.device)
            if isinstance(event, BrokerSessionLost):  # the final model stays retained
                return [PublishModel(self.model)]
            return []
        if isinstance(event, Started):
            return self._on_started(event)
        if self.phase is Phase.IDLE:
            raise LocalProtocolError(f"{type(event).__name__} before Started")
        if isinstance(event, Tick):
            return self._on_tick(event)
        if isinstance(event, DeviceOnline):
            return self._on_online(event)
        if isinstance(event, DeviceOffline):
            self._note_leaving(event.device, event.now)
            self._gone(event.device)
            return self._maybe_close(event.now)
        if isinstance(event, UpdateReceived):
            return self._on_update(event)
        if isinstance(event, StatsReceived):
            return self._on_stats(event)
        if isinstance(event, BrokerSessionLost):
            return self._republish()
        raise LocalProtocolError(f"unknown event {event!r}")

    @property
    def ready(self) -> set[str]:
        """Online gateways that can take part (enough rows, a usable model)."""
        return self.online - self.unready

    def _on_online(self, event: DeviceOnline) -> list[Action]:
        device = event.device
        came = device not in self.online or device in self.unconfirmed
        self.unconfirmed.discard(device)
        self.left.pop(device, None)  # back: waited for again if ready
        self.online.add(device)
        self.known.add(device)
        self.rows_new[device] = max(0, event.rows_new)
        if event.ready:
            self.unready.discard(device)
        else:
            self.unready.add(device)
        actions = self._resync(device) if came else []
        if self.phase is Phase.WAITING:
            return actions + self._next_round(event.now)
        return actions + self._maybe_close(event.now)

    def _republish(self) -> list[Action]:
        """Put the retained state back: the current model (in full, since nobody can be
        assumed to hold a delta's base) and the round in progress. Gateways that had sent
        their update resend the cached one on the re-announcement (same message id)."""
        actions: list[Action] = []
        if self.phase is not Phase.STATISTICS:
            if self.model.encoding == "delta":
                self.model = self.downlink.resync(self.version, self.parent_hash, self.spec, self.lineage)
            actions.append(PublishModel(self.model))
        if self.phase in (Phase.COLLECTING, Phase.STATISTICS):
            actions.append(PublishRound(self._announcement()))
        return actions

    def release(self, device: str) -> list[Action]:
        """The operator's release of a quarantined gateway (takes effect at once)."""
        self.reputation, events = rep.release(self.reputation, device, self.round)
        return [GatewayReleased(e.device, e.round) for e in events]

    @property
    def ignored(self) -> set[str]:
        """Gateways whose updates are not used: quarantined or out of privacy budget."""
        return self.excluded | set(self.reputation.quarantined)

    @property
    def more_rounds(self) -> bool:
        return self.config.rounds == 0 or self.round <= self.config.rounds

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        meta = {
            "lineage": self.lineage,
            "spec": msgspec.to_builtins(self.spec),
            "round": self.round,
            "version": self.version,
            "phase": self.phase.value,
            "parent_hash": self.parent_hash.hex(),
            "optimizer_steps": self.optimizer_state.steps,
            "last_start": self.last_start,
            # a copy of the list (a held checkpoint must not follow later rounds); the entries
            # themselves are never changed once appended
            "history": list(self.history),
            "history_count": self.history_count,
            # who a resumed round waits for: a restart must not close it on the first updates
            "online": sorted(self.online),
            "unready": sorted(self.unready & self.online),
            "rows_new": {d: n for d, n in self.rows_new.items() if d in self.online},
            "last_summary": msgspec.to_builtins(self.last_summary) if self.last_summary else None,
            "rejected": dict(self.rejected),
            "excluded": sorted(self.excluded),
            "reputation": self.reputation.to_dict(),
            "ledger": self.ledger.to_dict() if self.ledger is not None else None,
        }
        arrays = {**self.optimizer_state.to_arrays(), **self.downlink.to_arrays()}
        return Checkpoint([w.copy() for w in self.weights], meta, arrays)

    def restore(self, checkpoint: Checkpoint) -> None:
        """Resume a saved state. Raises :class:`IncompatibleState` when it belongs to a
        model other than the configured one (a new lineage is needed)."""
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError("restore() only before Started")
        meta = checkpoint.meta
        saved_spec = msgspec.convert(meta["spec"], ModelSpec) if meta.get("spec") else None
        if saved_spec is not None and architecture(saved_spec) != architecture(self.spec):
            raise changed(saved_spec, self.spec, str(meta.get("lineage", "")))
        if saved_spec is not None and self._scaling_changed(saved_spec, int(meta["version"])):
            raise IncompatibleState(f"lineage {meta.get('lineage', '?')} was trained with scaling "
                                    f"{'federated' if saved_spec.has_scaler else 'none'}",
                                    "scaling", self.config.scaling)
        if shapes_of(checkpoint.weights) != self.shapes:
            raise IncompatibleState(f"saved weights have shapes {shapes_of(checkpoint.weights)}, "
                                    f"the configured model {self.shapes}")
        if saved_spec is not None:
            self.spec = saved_spec  # with the lineage's fleet scaler
        self.lineage = str(meta.get("lineage", ""))
        self.weights = [np.asarray(w, np.float32) for w in checkpoint.weights]
        self.round = int(meta["round"])
        self.version = int(meta["version"])
        self.parent_hash = bytes.fromhex(meta["parent_hash"])
        self.last_start = float(meta.get("last_start", 0.0))
        self.history = list(meta.get("history", []))[-self.config.keep_history:]
        self.history_count = int(meta.get("history_count", len(self.history)))
        self.online = {str(d) for d in meta.get("online", [])}
        self.unready = {str(d) for d in meta.get("unready", [])} & self.online
        self.rows_new = {str(d): int(n) for d, n in meta.get("rows_new", {}).items() if d in self.online}
        self.known |= self.online
        self.unconfirmed = set(self.online)
        if meta.get("last_summary"):
            self.last_summary = msgspec.convert(meta["last_summary"], RoundSummary)
        self.rejected = dict(meta.get("rejected", {}))
        self.excluded = set(meta.get("excluded", []))
        if meta.get("reputation"):
            self.reputation = rep.ReputationState.from_dict(meta["reputation"])
        if meta.get("ledger") and self.ledger is not None:
            self.ledger = type(self.ledger).from_dict(meta["ledger"])  # type: ignore[attr-defined]
        self.optimizer_state = ServerOptimizerState.from_arrays(
            checkpoint.arrays, int(meta.get("optimizer_steps", 0))
        )
        if self.downlink.mode == "delta" and self.downlink.restore_held(checkpoint.arrays, self.shapes):
            # the delta reference is not a function of the master: re-send it in full
            self.model = self.downlink.resync(self.version, self.parent_hash, self.spec, self.lineage)
        else:
            self.model = self._make_model()
        if meta.get("phase") == Phase.FINISHED.value:
            self.phase = Phase.FINISHED
        self._resume_round = meta.get("phase") == Phase.COLLECTING.value

    def _scaling_changed(self, saved: ModelSpec, version: int) -> bool:
        """A lineage keeps the scaling it was trained with (a statistics round still in
        progress - no scaler, version 0 - may go on)."""
        if self.config.scaling == "none":
            return saved.has_scaler
        return not saved.has_scaler and version > 0

    # ---- transitions ---------------------------------------------------------------------

    def _on_started(self, event: Started) -> list[Action]:
        now = event.now
        self.started_at = now
        actions: list[Action] = []
        if self.phase is Phase.FINISHED:
            if not self.more_rounds:
                again = [PublishMetrics(self.last_summary, again=True)] if self.last_summary else []
                return [PublishModel(self.model), *again, RunFinished(self.round - 1, self.version)]
            self.phase = Phase.IDLE
            actions.append(RunContinued(self.round, self.version))
        if not self.lineage:
            self.lineage = new_lineage(now, event.entropy[:8] or self.rng.randbytes(2))
            self.model = self._make_model()
            actions.append(LineageStarted(self.lineage, self._needs_statistics()))
        if self._needs_statistics():
            return actions + self._start_statistics(now)
        actions.append(PublishModel(self.model))
        if self._resume_round:  # a restart mid-round re-announces that round, schedule or not
            self._resume_round = False
            actions += self._announce(now)
        else:
            actions += self._next_round(now)
        # the summary of the last commit may not have gone out before the restart
        return actions + ([PublishMetrics(self.last_summary, again=True)] if self.last_summary else [])

    def _needs_statistics(self) -> bool:
        return self.config.scaling == "federated" and not self.spec.has_scaler

    def _start_statistics(self, now: float) -> list[Action]:
        self.phase = Phase.STATISTICS
        self.stats = {}
        self.refused = set()
        self.attempt = 0
        self.announced_at = now
        self.deadline = now + self.config.round_timeout_s
        self.selected = ()
        return [SaveCheckpoint(self.checkpoint()), PublishRound(self._announcement())]

    def _next_round(self, now: float) -> list[Action]:
        """After a commit (or at start): announce the next round, wait for the schedule,
        or finish."""
        if not self.more_rounds:
            self.phase = Phase.FINISHED
            return [RunFinished(self.round - 1, self.version)]
        new_rows = sum(n for d, n in self.rows_new.items() if d in self.ready)
        verdict = next_round(self.config.schedule, now, self.last_start, new_rows)
        if not verdict.start:
            entering = self.phase is not Phase.WAITING
            changed = entering or verdict.waiting_for != self.waiting_for
            self.phase = Phase.WAITING
            self.waiting_for, self.next_check = verdict.waiting_for, verdict.check_at
            actions: list[Action] = [RoundWaiting(self.round, verdict.waiting_for)] if changed else []
            if entering:  # replaces the retained announcement of the round just committed
                actions.append(PublishRound(self._announcement()))
            return actions
        self.waiting_for, self.next_check = "", 0.0
        self.last_start = now
        return self._announce(now)

    def _announce(self, now: float) -> list[Action]:
        self._start_collecting(now)
        return [SaveCheckpoint(self.checkpoint()), PublishRound(self._announcement())]

    def _start_collecting(self, now: float) -> None:
        self.phase = Phase.COLLECTING
        self.received, self.deferred = self.deferred, {}  # (deferred: buffered mode only)
        self.refused = set()
        self.alerts = []
        self.attempt = 0
        self.announced_at = now
        self.half_at = None
        self.left = {}
        self.deadline = now + self.config.round_timeout_s
        self.selected = self._select()

    def _select(self) -> tuple[str, ...]:
        if self.config.fraction >= 1.0:
            return ()  # open round: every ready gateway that is not excluded
        pool = sorted(self.ready - self.ignored)
        k = max(self.config.min_participants, round(self.config.fraction * len(pool)))
        return tuple(sorted(self.rng.sample(pool, min(k, len(pool)))))

    def _announcement(self) -> RoundAnnouncement:
        if self.phase is Phase.STATISTICS:
            return RoundAnnouncement(round=0, model_version=-1, deadline=self.deadline,
                                     lineage=self.lineage, purpose="statistics")
        if self.phase is Phase.WAITING:  # nothing to do until the schedule allows round r
            return RoundAnnouncement(round=self.round, model_version=self.version,
                                     deadline=self.next_check, lineage=self.lineage, purpose="wait")
        return RoundAnnouncement(
            round=self.round,
            model_version=self.version,
            deadline=self.deadline,
            train=self.config.train,
            pipeline=self.config.pipeline,
            selected=self.selected,
            lineage=self.lineage,
            mode=self.config.mode,
        )

    def expected(self) -> set[str]:
        pool = set(self.selected) if self.selected else self.ready
        return pool - self.ignored

    def _gone(self, device: str) -> None:
        self.online.discard(device)
        self.unready.discard(device)
        self.unconfirmed.discard(device)
        self.rows_new.pop(device, None)
        self.downlink.went_offline(device)

    def _on_tick(self, event: Tick) -> list[Action]:
        if self.unconfirmed and event.now - self.started_at >= CONFIRM_S:
            for device in sorted(self.unconfirmed):  # no status since the restart: not there
                self._gone(device)
            closed = self._maybe_close(event.now)
            if closed:
                return closed
        if self.phase is Phase.WAITING:
            if self.next_check and event.now >= self.next_check:
                return self._next_round(event.now)
            return []
        if self.phase is Phase.COLLECTING and self._stragglers_due(event.now):
            return self._close_without_stragglers(event.now)
        if self.phase is Phase.COLLECTING and (self.is_buffered or self.left):
            closed = self._maybe_close(event.now)  # a buffer held for min_interval_s, or a
            if closed:                              # gateway that left and is not back in time
                return closed
        if event.now < self.deadline:
            return []
        answered = len(self.stats) if self.phase is Phase.STATISTICS else len(self.received)
        if answered >= self.quorum():
            if self.phase is Phase.STATISTICS:
                return self._fit_scaler(event.now)
            return self._aggregate(event.now)
        # quorum missed: extend and re-announce; keep what arrived
        self.attempt += 1
        self.deadline = event.now + self.config.round_timeout_s
        if self.config.fraction < 1.0 and self.phase is Phase.COLLECTING:
            self.selected = tuple(sorted(set(self.selected) | set(self._select())))
        round_ = 0 if self.phase is Phase.STATISTICS else self.round
        return [
            QuorumMissed(round_, answered, self.quorum()),
            PublishRound(self._announcement()),
        ]

    def _reject(self, device: str, round_: int, reason: str, detail: str = "") -> UpdateRejected:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return UpdateRejected(device, round_, reason, detail)

    # ---- the statistics round ------------------------------------------------------------

    def _on_stats(self, event: StatsReceived) -> list[Action]:
        device = event.device
        if self.phase is not Phase.STATISTICS:
            return [self._reject(device, 0, "late", "no statistics round in progress")]
        if device in self.stats:
            return [self._reject(device, 0, "duplicate_device", "already sent statistics")]
        try:
            check_stats(self.spec, self.lineage, event.stats)
        except RemoteProtocolError as exc:
            self.refused.add(device)
            return [self._reject(device, 0, exc.reason, exc.detail), *self._maybe_close(event.now)]
        self.stats[device] = event.stats
        return self._maybe_close(event.now)

    def _fit_scaler(self, now: float) -> list[Action]:
        devices = tuple(sorted(self.stats))
        self.spec = fleet_scaler(self.spec, self.stats.values())
        rows = sum(s.count for s in self.stats.values())
        self.stats = {}
        self.model = self._make_model()
        self.phase = Phase.WAITING  # the statistics round is over, whatever comes next
        # the scaler is part of the lineage: saved before anyone sees a model that uses it
        actions: list[Action] = [ScalerFitted(devices, rows, self.spec),
                                 SaveCheckpoint(self.checkpoint()), PublishModel(self.model)]
        return actions + self._next_round(now)

    # ---- training rounds -----------------------------------------------------------------

    def _on_update(self, event: UpdateReceived) -> list[Action]:
        update, device = event.update, event.device
        if self.phase is not Phase.COLLECTING:
            return [self._reject(device, update.round, "late", f"no round collecting ({self.phase.value})")]
        if event.message_id in self.seen_ids:
            return [self._reject(device, update.round, "duplicate", event.message_id)]
        if self.is_buffered:  # any round and base within max_staleness (aggregator.buffered)
            refused = buf.refusal(self.config.buffered, update.round, update.base_version,
                                  self.round, self.version)
            if refused is not None:
                return [self._reject(device, update.round, *refused)]
        elif update.round < self.round:
            return [self._reject(device, update.round, "late", f"round {update.round} < {self.round}")]
        elif update.round > self.round:
            return [self._reject(device, update.round, "wrong_round", f"round {update.round} > {self.round}")]
        if device in self.received and (refused := self._second_update_refusal(device, update)):
            return [self._reject(device, update.round, *refused)]
        if device in self.excluded:
            return [self._reject(device, update.round, "budget_spent", "privacy budget spent")]
        if device in self.reputation.quarantined:
            return [self._reject(device, update.round, "quarantined", "released only by an operator")]
        if self.selected and device not in self.selected:
            return [self._reject(device, update.round, "not_selected")]
        if update.base_version != self.version and not self.is_buffered:
            return [self._reject(device, update.round, "stale_base",
                                 f"built on version {update.base_version}, current {self.version}")]
        problem = self._validate(device, update)
        if isinstance(problem, UpdateRejected):
            # this gateway has answered the round, badly: do not wait for it
            self.refused.add(device)
            return [problem, *self._maybe_close(event.now)]
        delta = problem
        budget = self._charge_privacy(device, update.round, update.num_samples)
        if budget is not None:
            return [budget, *self._maybe_close(event.now)]
        # buffered: remembered by the buffer it went into (its own round may be far older)
        self.seen_ids[event.message_id] = self.round if self.is_buffered else update.round
        staleness = self.version - update.base_version
        if device in self.received:  # buffered: its second update goes into the next buffer
            staleness += 1
            self.deferred[device] = _Received(update, delta, event.wire_bytes, staleness)
        else:
            self.received[device] = _Received(update, delta, event.wire_bytes, staleness)
        actions: list[Action] = [UpdateAccepted(device, update.round, update.num_samples, staleness)]
        return actions + self._maybe_close(event.now)

    def _validate(self, device: str, update: ModelUpdate) -> Params | UpdateRejected:
        """Decode and check one update's content; the delta, or the rejection."""
        round_ = update.round
        if not 0 < update.num_samples <= MAX_SAMPLES:
            return self._reject(device, round_, "bad_samples", str(update.num_samples)[:40])
        if not math.isfinite(update.train_loss) or len(update.stats) > MAX_STATS or not all(
                len(k) <= MAX_STAT_KEY and math.isfinite(v) for k, v in update.stats.items()):
            return self._reject(device, round_, "bad_stats",
                                f"{len(update.stats)} statistics; at most {MAX_STATS}, finite")
        try:
            delta = self.decode(update.delta, self.shapes)
        except RemoteProtocolError as exc:
            return self._reject(device, round_, exc.reason, exc.detail)
        if any(not np.isfinite(d).all() for d in delta):
            return self._reject(device, round_, "not_finite")
        bound = self.config.max_update_norm
        if bound > 0 and (norm := l2_norm(delta)) > bound:
            return self._reject(device, round_, "norm_too_large", f"{norm:.3g} > {bound:.3g}")
        return delta

    def _charge_privacy(self, device: str, round_: int, num_samples: int) -> UpdateRejected | None:
        """Charge a noised update to the gateway's budget, or refuse it (policy "stop").

        Record level (``train.dp_noise > 0``, DP-SGD on the gateway): the update is
        ``dp_steps`` Gaussian steps Poisson-sampled at ``batch_size / num_samples``, both
        recomputed from the clear ``num_samples`` exactly as the gateway's training does.
        Update level: one release of the whole delta at the selection fraction.
        """
        train = self.config.train
        if train.dp_noise > 0:
            z, q, steps = train.dp_noise, sampling_rate(num_samples, train), dp_steps(num_samples, train)
        else:
            z, q, steps = self.config.pipeline.noise_multiplier, min(1.0, self.config.fraction), 1
        if self.ledger is None or z <= 0:
            return None
        decision = self.ledger.check(device, z, q, steps)
        if decision.alert:
            self.alerts.append(decision.alert)
        if not decision.allowed:
            self.excluded.add(device)
            self.refused.add(device)
            return self._reject(device, round_, "budget_spent", decision.alert)
        self.ledger.record(device, z, q, steps)
        return None

    def quorum(self) -> int:
        """``min_participants``, less the gateways whose updates are no longer used: a
        quarantined or budget-spent gateway must not block every later round."""
        usable = len(self.known - self.ignored)
        return max(1, min(self.config.min_participants, usable)) if self.ignored else self.config.min_participants

    def _maybe_close(self, now: float) -> list[Action]:
        if self.phase is Phase.STATISTICS:
            if len(self.stats) >= self.quorum() and self.expected() <= set(self.stats) | self.refused:
                return self._fit_scaler(now)
            return []
        if self.phase is not Phase.COLLECTING:
            return []
        got = len(self.received)
        if self.is_buffered:
            nobody_else = self.expected() <= set(self.received) | self.refused
            flush = buf.should_flush(self.config.buffered, got, self.quorum(), nobody_else,
                                     now - self.announced_at)
            return self._aggregate(now) if flush else []
        if got < self.quorum():
            return []
        if self._awaited(now) <= set(self.received) | self.refused:
            gone = sorted(set(self.left) - set(self.received) - self.refused - self.ignored)
            if gone:
                self.alerts.append(f"closed without {', '.join(gone)}: went offline during the round and was "
                                   f"not back within straggler_min_s ({self.config.straggler_min_s:g} s)")
            return self._aggregate(now)
        if self._stragglers_due(now):
            return self._close_without_stragglers(now)
        return []

    def _note_leaving(self, device: str, now: float) -> None:
        """An expected gateway that goes offline mid-round is awaited ``straggler_min_s`` more:
        a broker that stops publishes every gateway's last will, and the gateways come back
        with their updates a few seconds later."""
        if (self.phase is Phase.COLLECTING and self._straggler_rule() and device in self.expected()
                and device not in self.received and device not in self.refused):
            self.left[device] = now

    def _straggler_rule(self) -> bool:
        return self.config.straggler_factor > 0 and self.config.mode != "buffered"

    def _awaited(self, now: float) -> set[str]:
        """Whom a synchronous round still closes for: the expected, and those that left it
        less than ``straggler_min_s`` ago."""
        grace = self.config.straggler_min_s
        back_soon = {d for d, at in self.left.items() if now < at + grace}
        return self.expected() | (back_soon - self.ignored)

    def _stragglers_due(self, now: float) -> bool:
        """Rule 3's straggler window: has it opened, and has it passed?"""
        if not self._straggler_rule():
            return False  # off, or buffered: a buffer waits for nobody in particular (rule 6)
        if len(self.received) < self.quorum():
            return False
        expected = self._awaited(now)
        if 2 * len(expected & (set(self.received) | self.refused)) < len(expected):
            return False
        if self.half_at is None:
            self.half_at = now
        took = self.half_at - self.announced_at
        return now >= self.half_at + max(self.config.straggler_min_s, self.config.straggler_factor * took)

    def _close_without_stragglers(self, now: float) -> list[Action]:
        silent = sorted((self._awaited(now) | (set(self.left) - self.ignored)) - set(self.received)
                        - self.refused)
        assert self.half_at is not None
        if silent:
            self.alerts.append(f"closed without {', '.join(silent)}: no update {now - self.half_at:.1f} s "
                               "after half the round had answered (straggler window)")
        return self._aggregate(now)

    def _aggregate(self, now: float) -> list[Action]:
        devices = sorted(self.received)
        deltas = [self._weighted(self.received[d]) for d in devices]
        claimed = [float(self.received[d].update.num_samples) for d in devices]
        counts = cap_shares(claimed, self.config.max_sample_share)
        for device, was, now_ in zip(devices, claimed, counts, strict=True):
            if now_ < was:
                self.alerts.append(f"{device}'s {was:.0f} rows weighed as {now_:.0f} "
                                   f"(max_sample_share {self.config.max_sample_share:g})")
        # Deltas are relative to what the gateways hold (== the master in fp32 mode); the
        # server step applies them to the float master (docs/decisions.md, downlink).
        fused = self.fuse(deltas, counts, self.downlink.held)
        judged = self._judge(devices, deltas, fused)
        self.weights = apply_server_update(
            self.config.server, self.optimizer_state, self.weights, fused
        )
        self.parent_hash = body_hash(self.model)
        self.version += 1
        self.model = self._make_model()
        summary = self.last_summary = round_summary(self, devices, counts, now)
        # the gateways' holdout figures are of the model they trained from (version - 1)
        self.history.append({"round": self.round, "version": self.version,
                             "participants": len(devices), "rows": int(sum(claimed)),
                             "metric": summary.metrics.get(f"eval_{self.metric}", float("nan")),
                             "evaluated_version": self.version - 1,
                             "metrics": summary.metrics, "wall_s": summary.wall_s, "time": now})
        self.history_count += 1
        del self.history[:-self.config.keep_history]
        self.round += 1
        self._forget_old_ids()
        for device in devices:  # their rows are used; new ones arrive in their next status
            self.rows_new[device] = 0
        self.received = {}
        # One checkpoint covers the new model and what follows: a restart resumes there.
        follow = self._next_round(now)
        saves = [a for a in follow if isinstance(a, SaveCheckpoint)]
        rest = [a for a in follow if not isinstance(a, SaveCheckpoint)]
        checkpoint = saves[0] if saves else SaveCheckpoint(self.checkpoint())
        # the model, the commit (the runtime sends what must precede the next round, such
        # as a canary's deployment record, and leaves the rest for later) and the next
        # announcement first: they are the round's critical path; the summary follows
        announce = [a for a in rest if isinstance(a, PublishRound)]
        others = [a for a in rest if not isinstance(a, PublishRound)]
        return [*judged, checkpoint, PublishModel(self.model), ModelCommitted(self.version),
                *announce, PublishMetrics(summary), *others]

    def _judge(self, devices: list[str], deltas: list[Params], fused: Params) -> list[Action]:
        """Update reputations from each update's distance to the fused one; quarantine."""
        if self.config.reputation is None:
            return []
        distances = dict(zip(devices, outlier_distances(deltas, fused), strict=True))
        self.reputation, events = rep.observe(self.reputation, self.config.reputation,
                                              self.round, distances)
        actions: list[Action] = []
        for event in events:
            if isinstance(event, rep.Quarantined):
                self.alerts.append(f"{event.device} quarantined in round {event.round}: "
                                   f"score {event.score:.2f}, {event.outlier_rounds} outlier rounds")
                actions.append(GatewayQuarantined(event.device, event.round, event.score))
        return actions

    def _second_update_refusal(self, device: str, update: ModelUpdate) -> tuple[str, str] | None:
        """Why a gateway's second update while its first is in the open buffer is refused.
        Buffered: it (one trained before the gateway went away, one after it came back)
        waits for the next buffer instead, one at most, if it will still be within
        max_staleness there. One gateway never holds two places in one buffer."""
        if not self.is_buffered:
            return "duplicate_device", "already sent this round"
        if device in self.deferred:
            return "duplicate_device", "one update in this buffer and one waiting for the next"
        return buf.refusal(self.config.buffered, update.round, update.base_version,
                           self.round, self.version + 1)  # as it will stand in the next buffer

    def _weighted(self, received: _Received) -> Params:
        if not self.is_buffered:
            return received.delta
        weight = buf.staleness_weight(received.staleness, self.config.buffered.staleness_exponent)
        return buf.discount(received.delta, weight)

    @property
    def is_buffered(self) -> bool:
        return self.config.mode == "buffered"

    def _forget_old_ids(self) -> None:
        # buffered: an update stays admissible for max_staleness versions, so must its id
        keep = 2 + (self.config.buffered.max_staleness if self.is_buffered else 0)
        self.seen_ids = {m: r for m, r in self.seen_ids.items() if r >= self.round - keep}

    def _make_model(self) -> GlobalModel:
        # one committed round per version (GlobalModel.round == version)
        return self.downlink.message(self.weights, self.version, self.parent_hash, self.spec,
                                     self.online, self.lineage)

    def _resync(self, device: str) -> list[Action]:
        """A gateway came online while the retained model is a delta it may not be able to
        apply: re-send the current version in full (same version and parent)."""
        if not self.downlink.came_online(device, self.online):
            return []
        self.model = self.downlink.resync(self.version, self.parent_hash, self.spec, self.lineage)
        return [PublishModel(self.model)]
