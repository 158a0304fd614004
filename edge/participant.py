"""The gateway's participant state machine, the mirror of the aggregator's rounds.

Theory of operation
-------------------
Pure: ``handle(event) -> list[action]``. The runtime verifies signatures, decodes messages
and feeds them in; it runs training (CPU-bound, in a worker) when told to and feeds the
result back as ``TrainingFinished``.

- ``ModelReceived``: a newer global model is installed (an older or equal version is
  ignored; a successor whose parent hash does not match the installed model is refused).
  Installing may unblock a round that was announced for that version. A model may travel
  as fp32, int8 or an int8 delta on the previous version (``receive_model``); a delta on a
  version not held here is refused (``missing_base``) until a full model arrives, and a full
  re-send of the held version with bitwise-equal weights becomes the parent-hash chain head.
- ``RoundAnnounced`` for round ``r`` on version ``v``: if this gateway is not selected it
  sits out. If it already sent round ``r`` on ``v`` (the aggregator restarted, or the
  announcement was re-sent after a missed quorum) it re-publishes the cached update with
  the same message id, so the aggregator drops it if it had it. If it holds version ``v``
  it starts training; if not, it waits for the model.
- ``TrainingFinished``: delta = trained - global, run through the update pipeline
  (clip -> noise -> compress), cached and published. A result for a round that is no
  longer current is discarded.

- **Lineages.** Every model and announcement names its lineage (a fresh aggregator state,
  or a new task definition, starts a new one; ``fedcore.protocol.lineage``). A message of a
  *newer* lineage than the one held is followed: the old model, cached update and pending
  round are dropped and versions count from the new lineage's first model
  (``LineageChanged``). A message of an older lineage is refused (``old_lineage``), so a
  replayed or stale retained message cannot take the gateway back.
- ``RoundAnnounced`` with ``purpose == "statistics"`` (a lineage's first step): answer with
  this gateway's row statistics (``SendStatistics``); no model is needed for it. With
  ``purpose == "wait"`` (the aggregator waits for its schedule) there is nothing to do.

- **Buffered mode** (``RoundAnnouncement.mode == "buffered"``, ``aggregator.buffered``): there
  is no cohort to wait for. The gateway trains on the newest model it holds as soon as it
  holds one it has not trained on yet, and the announcement that follows each new version
  (``StartTraining`` names that version as the base and that buffer as the round), and
  publishes the result when training returns, even if a newer model arrived meanwhile: the
  aggregator folds it with a staleness weight instead of dropping it. Then it trains again
  on the newest model, if that is newer than the one just used. A buffered announcement
  carries the training and pipeline config; re-sends follow the synchronous rule.

Because the round and model topics are retained, a gateway that was offline catches up
from the latest announcement and model as soon as it reconnects.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

import numpy as np

from edge.privacy import GatewayLedger, before_training, charge, refusal
from fedcore.compression.downlink import decode_model
from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params, subtract
from fedcore.protocol.codec import body_hash, new_message_id
from fedcore.protocol.lineage import is_newer
from fedcore.protocol.messages import (
    EncodedDelta,
    GlobalModel,
    ModelUpdate,
    PipelineConfig,
    RoundAnnouncement,
    TrainConfig,
)
from fedcore.protocol.tensors import encode_tensors

# (delta, pipeline config) -> (encoded delta, extra stats such as the pre-clip norm)
EncodeFn = Callable[[Params, PipelineConfig], tuple[EncodedDelta, dict[str, float]]]


def encode_raw(delta: Params, _config: PipelineConfig) -> tuple[EncodedDelta, dict[str, float]]:
    shapes = tuple(tuple(int(d) for d in a.shape) for a in delta)
    return EncodedDelta((), shapes, encode_tensors([np.asarray(a, np.float32) for a in delta])), {}


def receive_model(model: GlobalModel, held_version: int, held: Params | None) -> Params | None:
    """The weights a model message stands for, given the version and weights held here.

    fp32 and int8 models decode on their own; a delta (``encoding == "delta"``) applies only
    on top of version ``model.version - 1``: otherwise None (wait for a full model). Raises
    RemoteProtocolError for a malformed message. Every receiver of the model topic (the
    gateway, the demo's observer) decodes with this function, so all hold the same weights.
    """
    if model.encoding == "delta":
        if held is None or model.version != held_version + 1:
            return None
        shapes = tuple(tuple(int(d) for d in a.shape) for a in held)
        return decode_model(model.encoding, model.tensors, model.scales, shapes, held)
    shapes = tuple(tuple(int(d) for d in t.shape) for t in model.tensors)
    return decode_model(model.encoding, model.tensors, model.scales, shapes)


class ParticipantPhase(Enum):
    WAITING_MODEL = "waiting_model"
    READY = "ready"
    TRAINING = "training"


# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ModelReceived:
    now: float
    model: GlobalModel


@dataclass(frozen=True, slots=True)
class RoundAnnounced:
    now: float
    announcement: RoundAnnouncement


@dataclass(frozen=True, slots=True)
class TrainingFinished:
    now: float
    round: int
    base_version: int
    weights: Params
    num_samples: int
    train_loss: float
    stats: dict[str, float]
    lineage: str = ""  # of the StartTraining it answers: rounds restart in a new lineage


@dataclass(frozen=True, slots=True)
class TrainingFailed:
    """Local training produced no usable model (diverged, no data): sit this round out."""

    now: float
    round: int
    reason: str


Event = ModelReceived | RoundAnnounced | TrainingFinished | TrainingFailed

# ---- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InstallModel:
    model: GlobalModel
    weights: Params


@dataclass(frozen=True, slots=True)
class StartTraining:
    round: int
    base_version: int
    weights: Params
    train: TrainConfig
    lineage: str = ""


@dataclass(frozen=True, slots=True)
class PublishUpdate:
    round: int
    message_id: str
    update: ModelUpdate
    resend: bool = False


@dataclass(frozen=True, slots=True)
class ModelRefused:
    version: int
    reason: str


@dataclass(frozen=True, slots=True)
class SatOut:
    round: int
    reason: str


@dataclass(frozen=True, slots=True)
class PolicyMet:
    """A round complies with the gateway's [privacy] policy again after one that did not."""

    round: int


@dataclass(frozen=True, slots=True)
class SendStatistics:
    round: int
    lineage: str


@dataclass(frozen=True, slots=True)
class LineageChanged:
    old: str
    new: str


Action = (InstallModel | StartTraining | PublishUpdate | ModelRefused | SatOut | SendStatistics
          | LineageChanged | PolicyMet)


class Participant:
    """Pure gateway round logic. See the module docstring for the rules."""

    def __init__(self, device: str, encode: EncodeFn = encode_raw, lineage: str = "",
                 ledger: GatewayLedger | None = None) -> None:
        self.device = device
        # the gateway's own [privacy] policy and epsilon ledger (edge.privacy); None = no policy
        self.ledger = ledger
        self.refusing = False  # the last announcement broke the policy
        self.last_samples = 0  # training rows of the last update: the record-level cost estimate
        self.encode = encode
        self.lineage = lineage
        self.phase = ParticipantPhase.WAITING_MODEL
        self.model: GlobalModel | None = None
        self.model_hash = b""
        self.weights: Params | None = None
        self.pending: RoundAnnouncement | None = None
        self.training_round = -1
        self.last_sent: PublishUpdate | None = None
        self.last_sent_base = -1
        # buffered mode: the announcement in force, and the weights the running training
        # started from (its delta is relative to them, whatever model arrives meanwhile)
        self.buffered: RoundAnnouncement | None = None
        self.training_base: Params | None = None
        self.trained_version = -1  # newest base version trained on in this lineage

    @property
    def version(self) -> int:
        return self.model.version if self.model is not None else -1

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, ModelReceived):
            return self._on_model(event.model)
        if isinstance(event, RoundAnnounced):
            return self._on_round(event.announcement)
        if isinstance(event, TrainingFinished):
            return self._on_trained(event)
        if isinstance(event, TrainingFailed):
            self.phase = ParticipantPhase.READY
            actions: list[Action] = [SatOut(event.round, event.reason)]
            if self.buffered is not None:  # try again on the next model, not in a loop now
                self.training_base = None
                return actions
            if self.pending is not None and self.pending.round != event.round:
                return actions + self._restart_if_pending()
            self.pending, self.training_round = None, -1
            return actions
        raise TypeError(f"unknown event {event!r}")

    def _follow(self, lineage: str) -> list[Action]:
        """Switch to a newer lineage: nothing of the old one is kept."""
        old, self.lineage = self.lineage, lineage
        self.phase = ParticipantPhase.WAITING_MODEL  # a running training's result is obsolete
        self.model, self.model_hash, self.weights = None, b"", None
        self.training_round = -1
        self.last_sent, self.last_sent_base = None, -1
        self.buffered, self.training_base, self.trained_version = None, None, -1
        if self.pending is not None and self.pending.lineage != lineage:
            self.pending = None
        return [LineageChanged(old, lineage)]

    def _on_model(self, model: GlobalModel) -> list[Action]:
        switched: list[Action] = []
        if model.lineage != self.lineage:
            if not is_newer(model.lineage, self.lineage):
                return [ModelRefused(model.version, "old_lineage")]
            switched = self._follow(model.lineage)
        return switched + self._on_model_of_lineage(model)

    def _on_model_of_lineage(self, model: GlobalModel) -> list[Action]:
        if model.version == self.version and self.model is not None:
            self._adopt_resync(model)
            return []
        if model.version <= self.version:
            return []  # retained redelivery or an older model: nothing to do
        if (self.model is not None and model.version == self.version + 1
                and model.parent_hash != self.model_hash):
            return [ModelRefused(model.version, "bad_parent")]
        try:
            weights = receive_model(model, self.version, self.weights)
        except RemoteProtocolError as exc:
            return [ModelRefused(model.version, exc.reason)]
        if weights is None:
            # a delta on a version this gateway does not hold: the aggregator re-sends the
            # version in full when it sees this gateway come online (aggregator.downlink)
            return [ModelRefused(model.version, "missing_base")]
        self.model = model
        self.model_hash = body_hash(model)
        self.weights = weights
        if self.phase is ParticipantPhase.WAITING_MODEL:
            self.phase = ParticipantPhase.READY
        actions: list[Action] = [InstallModel(model, weights)]
        if self.buffered is not None:
            return actions + self._train_buffered()
        if self.pending is not None and self.phase is not ParticipantPhase.TRAINING:
            pending, self.pending = self.pending, None
            actions += self._on_round(pending)
        return actions

    def _adopt_resync(self, model: GlobalModel) -> None:
        """A full re-send of the version held here becomes the chain head if it decodes to
        exactly the held weights (the next version names it as parent)."""
        if model.encoding == "delta" or body_hash(model) == self.model_hash or self.weights is None:
            return
        try:
            weights = receive_model(model, self.version, self.weights)
        except RemoteProtocolError:
            return
        if weights is not None and len(weights) == len(self.weights) and all(
                a.shape == b.shape and np.array_equal(a, b) for a, b in zip(weights, self.weights, strict=True)):
            self.model = model
            self.model_hash = body_hash(model)

    def _on_round(self, ann: RoundAnnouncement) -> list[Action]:
        if ann.lineage != self.lineage and not is_newer(ann.lineage, self.lineage):
            return [SatOut(ann.round, "old_lineage")]
        if ann.purpose == "wait":
            return []  # the aggregator waits for its schedule: nothing to train
        met: list[Action] = []
        if ann.purpose != "statistics" and self.ledger is not None:
            # checked before selection, so a gateway that refused sees a later round comply
            reason = before_training(self.ledger, ann, self.last_samples)
            if reason:
                self.refusing, self.pending = True, None
                if self.buffered is not None and self.buffered.lineage == ann.lineage:
                    self.buffered = None  # no more training under the old announcement
                return [SatOut(ann.round, reason)]
            if self.refusing:
                self.refusing, met = False, [PolicyMet(ann.round)]
        return met + self._on_round_checked(ann)

    def _on_round_checked(self, ann: RoundAnnouncement) -> list[Action]:
        if ann.selected and self.device not in ann.selected:
            return [SatOut(ann.round, "not_selected")]
        if ann.purpose == "statistics":
            return [SendStatistics(ann.round, ann.lineage)]
        if ann.lineage != self.lineage:
            self.pending = ann  # wait for the new lineage's model
            return []
        sent = self.last_sent
        if sent is not None and sent.round == ann.round and self.last_sent_base == ann.model_version:
            return [PublishUpdate(sent.round, sent.message_id, sent.update, resend=True)]
        if ann.mode == "buffered":
            self.buffered, self.pending = ann, None
            return self._train_buffered()
        self.buffered = None  # back to synchronous rounds
        if sent is not None and ann.round <= sent.round:
            return []  # an old announcement (retained) for a round already done
        if self.phase is ParticipantPhase.TRAINING:
            if ann.round != self.training_round:
                self.pending = ann  # picked up when the running training returns
            return []
        if ann.model_version > self.version:
            self.pending = ann  # wait for the model it was announced on
            return []
        if ann.model_version < self.version:
            return []  # stale announcement; the fresh one follows the model
        assert self.weights is not None
        self.phase = ParticipantPhase.TRAINING
        self.training_round = ann.round
        self.pending = ann
        return [StartTraining(ann.round, ann.model_version, self.weights, ann.train, ann.lineage)]

    def _train_buffered(self) -> list[Action]:
        """Buffered mode: train on the newest model held, unless already trained on it."""
        ann = self.buffered
        if (ann is None or self.phase is not ParticipantPhase.READY or self.weights is None
                or ann.lineage != self.lineage or ann.model_version != self.version
                or self.version <= self.trained_version):
            # busy, trained on this one already, or the model and its announcement (which
            # follows each new version) do not match yet
            return []
        self.phase = ParticipantPhase.TRAINING
        self.training_round, self.training_base = ann.round, self.weights
        self.trained_version = self.version
        return [StartTraining(ann.round, self.version, self.weights, ann.train, ann.lineage)]

    def _on_trained_buffered(self, event: TrainingFinished) -> list[Action]:
        ann, base = self.buffered, self.training_base
        self.phase, self.training_base = ParticipantPhase.READY, None
        if (ann is None or base is None or event.lineage != self.lineage
                or event.round != self.training_round):
            return self._restart_if_pending()  # a result of another lineage or mode: obsolete
        action = self._publish(event, subtract(event.weights, base), ann)
        return [action, *self._train_buffered()]

    def _on_trained(self, event: TrainingFinished) -> list[Action]:
        if self.training_base is not None:
            return self._on_trained_buffered(event)
        ann = self.pending
        if (ann is None or event.round != self.training_round or event.lineage != self.lineage
                or event.base_version != self.version or ann.round != event.round
                or ann.lineage != event.lineage):
            # obsolete result: a newer round or model arrived meanwhile
            self.phase = ParticipantPhase.READY
            return self._restart_if_pending()
        assert self.weights is not None
        self.pending = None
        self.phase = ParticipantPhase.READY
        return [self._publish(event, subtract(event.weights, self.weights), ann)]

    def _publish(self, event: TrainingFinished, delta: Params,
                 ann: RoundAnnouncement) -> PublishUpdate | SatOut:
        self.last_samples = event.num_samples
        if self.ledger is not None and self.ledger.policy.active:
            # the definitive check, with the real number of rows; charged before it goes out
            cost = charge(self.ledger.policy, ann, event.num_samples)
            reason = refusal(self.ledger.policy, ann) or self.ledger.over_budget(cost)
            if reason:
                self.refusing = True
                return SatOut(event.round, reason)
            self.ledger.record(cost)
        encoded, info = self.encode(delta, ann.pipeline)
        private = ann.pipeline.noise_multiplier > 0 or ann.train.dp_noise > 0
        update = ModelUpdate(
            round=event.round,
            base_version=event.base_version,
            num_samples=event.num_samples,
            delta=encoded,
            # Under DP only the noised delta is covered by the guarantee: the clear loss and
            # evaluation figures would leak around it, so they stay on the gateway.
            train_loss=0.0 if private else event.train_loss,
            clipped=bool(info.get("clipped", 0.0)),
            stats={**({} if private else event.stats),
                   **{k: v for k, v in info.items() if k != "clipped"}},
        )
        action = PublishUpdate(event.round, new_message_id(), update)
        self.last_sent = action
        self.last_sent_base = event.base_version
        return action

    def _restart_if_pending(self) -> list[Action]:
        ann, self.pending = self.pending, None
        self.training_round = -1
        # (a buffered announcement that came during a synchronous training starts one now)
        return self._on_round(ann) if ann is not None else self._train_buffered()
