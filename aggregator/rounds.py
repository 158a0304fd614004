"""The aggregator's round state machine: announce -> collect -> aggregate -> commit.

Theory of operation
-------------------
The machine is pure: ``handle(event) -> list[action]``. Events carry ``now`` (unix seconds);
the runtime feeds transport messages and timer ticks in and carries the actions out
(publish, checkpoint, log). Randomness (client sampling) comes from the ``random.Random``
given at construction.

Rules, in order of a round ``r`` on global model version ``v``:

1. ``Started`` (or a commit) -> announce round ``r``: the selected gateways, a deadline, the
   training and pipeline config. A checkpoint is taken *before* the announcement so that a
   restarted aggregator re-announces the same round (gateways that already trained resend
   their cached update; duplicates are dropped by message id).
2. ``UpdateReceived`` while collecting round ``r`` is accepted once per gateway if it is for
   round ``r``, built on version ``v``, from a selected gateway, decodes within bounds,
   has the expected shapes, is finite and within the norm bound. Anything else is an
   ``UpdateRejected`` action with a stable reason (``late``, ``wrong_round``, ``duplicate``,
   ``duplicate_device``, ``stale_base``, ``not_selected``, ``bad_samples``,
   ``norm_too_large`` or the decoder's reason) - counted, never an exception.
3. The round closes as soon as every expected gateway (selected and online) has sent, with
   at least ``min_participants`` updates; or at the deadline with at least
   ``min_participants`` (less the quarantined or budget-spent gateways, which can no longer
   count). A deadline with fewer is *quorum missed*: the deadline is
   extended and the round re-announced (an event in the summary, not an error).
4. Aggregate: fuse the deltas (the configured rule), apply the server optimizer, bump the
   version, chain the parent hash, checkpoint, publish the model (retained) and the round
   summary, then announce ``r + 1`` or finish after ``rounds`` rounds.
5. Downlink (``RoundConfig.downlink``): the model travels as fp32, int8 or an int8 delta
   on the previous version; ``aggregator.downlink`` keeps what gateways hold (the fused
   delta is relative to it) and re-sends the current version in full when a gateway comes
   online while the retained model is a delta.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import numpy as np

from aggregator import reputation as rep
from aggregator import robust
from aggregator.downlink import Downlink
from aggregator.robust import outlier_distances
from aggregator.round_events import (
    Action as Action,
)
from aggregator.round_events import (
    BrokerSessionLost as BrokerSessionLost,
)
from aggregator.round_events import (
    Checkpoint as Checkpoint,
)
from aggregator.round_events import (
    DeviceOffline as DeviceOffline,
)
from aggregator.round_events import (
    DeviceOnline as DeviceOnline,
)
from aggregator.round_events import (
    Event as Event,
)
from aggregator.round_events import (
    GatewayQuarantined as GatewayQuarantined,
)
from aggregator.round_events import (
    GatewayReleased as GatewayReleased,
)
from aggregator.round_events import (
    PublishMetrics as PublishMetrics,
)
from aggregator.round_events import (
    PublishModel as PublishModel,
)
from aggregator.round_events import (
    PublishRound as PublishRound,
)
from aggregator.round_events import (
    QuorumMissed as QuorumMissed,
)
from aggregator.round_events import (
    RunFinished as RunFinished,
)
from aggregator.round_events import (
    SaveCheckpoint as SaveCheckpoint,
)
from aggregator.round_events import (  # re-exported: callers use rounds.Started etc.
    Started as Started,
)
from aggregator.round_events import (
    Tick as Tick,
)
from aggregator.round_events import (
    UpdateAccepted as UpdateAccepted,
)
from aggregator.round_events import (
    UpdateReceived as UpdateReceived,
)
from aggregator.round_events import (
    UpdateRejected as UpdateRejected,
)
from aggregator.server_optim import (
    ServerOptimizerConfig,
    ServerOptimizerState,
    apply_server_update,
)
from fedcore.errors import LocalProtocolError, RemoteProtocolError
from fedcore.learning.params import Params, Shapes, l2_norm, shapes_of
from fedcore.pipeline import decode_update
from fedcore.privacy.dpsgd import dp_steps, sampling_rate
from fedcore.protocol.codec import body_hash
from fedcore.protocol.messages import (
    EncodedDelta,
    GlobalModel,
    ModelSpec,
    ModelUpdate,
    PipelineConfig,
    RoundAnnouncement,
    RoundSummary,
    TrainConfig,
)

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
    COLLECTING = "collecting"
    FINISHED = "finished"


@dataclass(frozen=True, slots=True)
class RoundConfig:
    rounds: int = 10
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


@dataclass
class _Received:
    update: ModelUpdate
    delta: Params
    wire_bytes: int


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
        self.round = 1
        self.version = 0
        self.parent_hash = b""
        self.online: set[str] = set()
        self.downlink = Downlink(config.downlink, config.downlink_full_every)
        self.model = self._make_model()
        self.known: set[str] = set()  # every gateway seen online since start
        self.selected: tuple[str, ...] = ()
        self.deadline = 0.0
        self.announced_at = 0.0
        self.attempt = 0
        self.received: dict[str, _Received] = {}
        self.refused: set[str] = set()  # gateways whose update this round failed validation
        self.seen_ids: dict[str, int] = {}  # message id -> round, for duplicate detection
        self.rejected: dict[str, int] = {}
        self.history: list[dict[str, Any]] = []
        self.excluded: set[str] = set()  # out of privacy budget
        self.reputation = rep.ReputationState()

    # ---- public API --------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self.phase is Phase.FINISHED:
            if isinstance(event, UpdateReceived):
                return [self._reject(event.device, event.update.round, "finished", "run is over")]
            return []
        if isinstance(event, Started):
            return self._on_started(event)
        if self.phase is Phase.IDLE:
            raise LocalProtocolError(f"{type(event).__name__} before Started")
        if isinstance(event, Tick):
            return self._on_tick(event)
        if isinstance(event, DeviceOnline):
            self.online.add(event.device)
            self.known.add(event.device)
            return self._resync(event.device) + self._maybe_close(event.now)
        if isinstance(event, DeviceOffline):
            self.online.discard(event.device)
            self.downlink.went_offline(event.device)
            return self._maybe_close(event.now)
        if isinstance(event, UpdateReceived):
            return self._on_update(event)
        if isinstance(event, BrokerSessionLost):
            return self._republish()
        raise LocalProtocolError(f"unknown event {event!r}")

    def _republish(self) -> list[Action]:
        """Put the retained state back: the current model (in full, since nobody can be
        assumed to hold a delta's base) and the round in progress. Gateways that had sent
        their update resend the cached one on the re-announcement (same message id)."""
        if self.model.encoding == "delta":
            self.model = self.downlink.resync(self.version, self.parent_hash, self.spec)
        actions: list[Action] = [PublishModel(self.model)]
        if self.phase is Phase.COLLECTING:
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

    # ---- checkpoints ---------------------------------------------------------------------

    def checkpoint(self) -> Checkpoint:
        meta = {
            "round": self.round,
            "version": self.version,
            "phase": self.phase.value,
            "parent_hash": self.parent_hash.hex(),
            "optimizer_steps": self.optimizer_state.steps,
            "history": self.history,
            "rejected": self.rejected,
            "excluded": sorted(self.excluded),
            "reputation": self.reputation.to_dict(),
            "ledger": self.ledger.to_dict() if self.ledger is not None else None,
        }
        arrays = {**self.optimizer_state.to_arrays(), **self.downlink.to_arrays()}
        return Checkpoint([w.copy() for w in self.weights], meta, arrays)

    def restore(self, checkpoint: Checkpoint) -> None:
        if self.phase is not Phase.IDLE:
            raise LocalProtocolError("restore() only before Started")
        if shapes_of(checkpoint.weights) != self.shapes:
            raise LocalProtocolError("checkpoint shapes do not match the configured model")
        meta = checkpoint.meta
        self.weights = [np.asarray(w, np.float32) for w in checkpoint.weights]
        self.round = int(meta["round"])
        self.version = int(meta["version"])
        self.parent_hash = bytes.fromhex(meta["parent_hash"])
        self.history = list(meta.get("history", []))
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
            self.model = self.downlink.resync(self.version, self.parent_hash, self.spec)
        else:
            self.model = self._make_model()
        if meta.get("phase") == Phase.FINISHED.value:
            self.phase = Phase.FINISHED

    # ---- transitions ---------------------------------------------------------------------

    def _on_started(self, event: Started) -> list[Action]:
        if self.phase is Phase.FINISHED:
            return [PublishModel(self.model), RunFinished(self.round - 1, self.version)]
        actions: list[Action] = [PublishModel(self.model)]
        actions += self._announce(event.now)
        return actions

    def _announce(self, now: float) -> list[Action]:
        self._start_collecting(now)
        return [SaveCheckpoint(self.checkpoint()), PublishRound(self._announcement())]

    def _start_collecting(self, now: float) -> None:
        self.phase = Phase.COLLECTING
        self.received = {}
        self.refused = set()
        self.alerts = []
        self.attempt = 0
        self.announced_at = now
        self.deadline = now + self.config.round_timeout_s
        self.selected = self._select()

    def _select(self) -> tuple[str, ...]:
        if self.config.fraction >= 1.0:
            return ()  # open round: every online gateway that is not excluded
        pool = sorted(self.online - self.ignored)
        k = max(self.config.min_participants, round(self.config.fraction * len(pool)))
        return tuple(sorted(self.rng.sample(pool, min(k, len(pool)))))

    def _announcement(self) -> RoundAnnouncement:
        return RoundAnnouncement(
            round=self.round,
            model_version=self.version,
            deadline=self.deadline,
            train=self.config.train,
            pipeline=self.config.pipeline,
            selected=self.selected,
        )

    def _expected(self) -> set[str]:
        pool = set(self.selected) if self.selected else self.online
        return pool - self.ignored

    def _on_tick(self, event: Tick) -> list[Action]:
        if event.now < self.deadline:
            return []
        if len(self.received) >= self._quorum():
            return self._aggregate(event.now)
        # quorum missed: extend and re-announce; keep what arrived
        self.attempt += 1
        self.deadline = event.now + self.config.round_timeout_s
        if self.config.fraction < 1.0:
            self.selected = tuple(sorted(set(self.selected) | set(self._select())))
        return [
            QuorumMissed(self.round, len(self.received), self._quorum()),
            PublishRound(self._announcement()),
        ]

    def _reject(self, device: str, round_: int, reason: str, detail: str = "") -> UpdateRejected:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return UpdateRejected(device, round_, reason, detail)

    def _on_update(self, event: UpdateReceived) -> list[Action]:
        update, device = event.update, event.device
        if event.message_id in self.seen_ids:
            return [self._reject(device, update.round, "duplicate", event.message_id)]
        if update.round < self.round:
            return [self._reject(device, update.round, "late", f"round {update.round} < {self.round}")]
        if update.round > self.round:
            return [self._reject(device, update.round, "wrong_round", f"round {update.round} > {self.round}")]
        if device in self.received:
            return [self._reject(device, update.round, "duplicate_device", "already sent this round")]
        if device in self.excluded:
            return [self._reject(device, update.round, "budget_spent", "privacy budget spent")]
        if device in self.reputation.quarantined:
            return [self._reject(device, update.round, "quarantined", "released only by an operator")]
        if self.selected and device not in self.selected:
            return [self._reject(device, update.round, "not_selected")]
        if update.base_version != self.version:
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
        self.seen_ids[event.message_id] = update.round
        self.received[device] = _Received(update, delta, event.wire_bytes)
        actions: list[Action] = [UpdateAccepted(device, update.round, update.num_samples)]
        return actions + self._maybe_close(event.now)

    def _validate(self, device: str, update: ModelUpdate) -> Params | UpdateRejected:
        """Decode and check one update's content; the delta, or the rejection."""
        round_ = update.round
        if update.num_samples <= 0:
            return self._reject(device, round_, "bad_samples", str(update.num_samples))
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

    def _quorum(self) -> int:
        """``min_participants``, less the gateways whose updates are no longer used: a
        quarantined or budget-spent gateway must not block every later round."""
        usable = len(self.known - self.ignored)
        return max(1, min(self.config.min_participants, usable)) if self.ignored else self.config.min_participants

    def _maybe_close(self, now: float) -> list[Action]:
        if self.phase is not Phase.COLLECTING:
            return []
        got = len(self.received)
        if got < self._quorum():
            return []
        if self._expected() <= set(self.received) | self.refused:
            return self._aggregate(now)
        return []

    def _aggregate(self, now: float) -> list[Action]:
        devices = sorted(self.received)
        deltas = [self.received[d].delta for d in devices]
        counts = [float(self.received[d].update.num_samples) for d in devices]
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
        summary = self._summary(devices, counts, now)
        self.history.append({"round": self.round, "participants": len(devices),
                             "metrics": summary.metrics, "wall_s": summary.wall_s})
        finished_round = self.round
        self.round += 1
        self._forget_old_ids()
        if finished_round >= self.config.rounds:
            self.phase = Phase.FINISHED
            return [*judged, SaveCheckpoint(self.checkpoint()), PublishModel(self.model),
                    PublishMetrics(summary), RunFinished(finished_round, self.version)]
        # One checkpoint covers the new model and the next round: a restart resumes there.
        self._start_collecting(now)
        return [*judged, SaveCheckpoint(self.checkpoint()), PublishModel(self.model),
                PublishMetrics(summary), PublishRound(self._announcement())]

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

    def _forget_old_ids(self) -> None:
        self.seen_ids = {m: r for m, r in self.seen_ids.items() if r >= self.round - 2}

    def _summary(self, devices: list[str], counts: list[float], now: float) -> RoundSummary:
        metrics: dict[str, float] = {}
        total = sum(counts)
        keys = {k for d in devices for k in self.received[d].update.stats}
        for key in sorted(keys):
            pairs = [(self.received[d].update.stats[key], c) for d, c in zip(devices, counts, strict=True)
                     if key in self.received[d].update.stats]
            weight = sum(c for _, c in pairs)
            if weight > 0:
                metrics[key] = float(sum(v * c for v, c in pairs) / weight)
            if key.endswith("_s"):  # timings: the slowest gateway bounds the round
                metrics[f"{key}_max"] = float(max(v for v, _ in pairs))
        metrics["train_loss"] = float(
            sum(self.received[d].update.train_loss * c for d, c in zip(devices, counts, strict=True)) / total
        )
        return RoundSummary(
            round=self.round,
            model_version=self.version,
            participants=tuple(devices),
            num_samples=int(total),
            metrics=metrics,
            bytes_up=sum(self.received[d].wire_bytes for d in devices),
            wall_s=now - self.announced_at,
            rejected=dict(self.rejected),
            epsilon=self.ledger.spent() if self.ledger is not None else {},
            alerts=tuple(self.alerts),
        )

    def _make_model(self) -> GlobalModel:
        # one committed round per version (GlobalModel.round == version)
        return self.downlink.message(self.weights, self.version, self.parent_hash, self.spec,
                                     self.online)

    def _resync(self, device: str) -> list[Action]:
        """A gateway came online while the retained model is a delta it may not be able to
        apply: re-send the current version in full (same version and parent)."""
        if not self.downlink.came_online(device, self.online):
            return []
        self.model = self.downlink.resync(self.version, self.parent_hash, self.spec)
        return [PublishModel(self.model)]
