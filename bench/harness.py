"""An in-memory federation for benchmarks: the real state machines, the real codec, real training.

Theory of operation
-------------------
One ``aggregator.rounds.RoundStateMachine`` and one ``edge.participant.Participant`` per
unit of a ``FederatedDataset`` are wired together without a broker, like ``tests/pair.py``,
but every message is what the services would publish:

- the aggregator's ``PublishModel`` / ``PublishRound`` bodies are wrapped in a real envelope
  (``codec.make_envelope``), encoded to bytes, counted once per receiving gateway
  (downlink), decoded and handed to each participant;
- a participant's ``StartTraining`` runs ``train_local`` on that gateway's own training rows;
  ``TrainingFinished`` goes back in, the participant runs the update pipeline (the encoder
  from ``fedcore.pipeline.make_encoder`` with the gateway's own ``EdgePipelineState``, so
  error feedback carries across rounds) and its ``PublishUpdate`` is enveloped, encoded,
  counted (uplink), decoded and fed to the aggregator as ``UpdateReceived``;
- the aggregator decodes updates with ``fedcore.pipeline.decode_update`` and, under DP,
  charges each accepted update to a ``PrivacyLedger``.

Everything is delivered at one fixed ``now``: every gateway answers every round, so each
round closes on its last update, never on a deadline. Envelopes are unsigned; a signed
message is 64 bytes (Ed25519) longer in both directions.

Byte accounting per round ``r`` (per gateway): *up* is the encoded ``update`` envelope it
sent for ``r``; *down* is the encoded ``model`` envelope (version ``r - 1``) plus the encoded
``round`` announcement that started ``r``. The model published after the last round is
counted separately (``final_model_bytes``), not in any round.

The harness owns its randomness: per-gateway training and pipeline generators and the
aggregator's ``random.Random`` all derive from ``seed``.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import numpy as np

from aggregator import rounds as agg
from aggregator.rounds import Ledger, RoundConfig
from edge import participant as edge
from edge.participant import receive_model
from fedcore.datasets import FederatedDataset
from fedcore.learning.params import Params
from fedcore.learning.training import train_local
from fedcore.pipeline import EdgePipelineState, decode_update, make_encoder
from fedcore.protocol import codec
from fedcore.protocol.messages import (
    GlobalModel,
    Kind,
    ModelSpec,
    ModelUpdate,
    RoundAnnouncement,
)

FLEET, TASK, AGGREGATOR = "bench", "pipeline", "aggregator"
EvaluateFn = Callable[[Params], dict[str, float]]


@dataclass
class RoundRecord:
    """What one committed round cost on the wire and what the model it produced scores."""

    round: int
    up_bytes: dict[str, int] = field(default_factory=dict)  # gateway -> update envelope
    delta_bytes: dict[str, int] = field(default_factory=dict)  # the EncodedDelta alone
    down_bytes: dict[str, int] = field(default_factory=dict)  # gateway -> model + round
    metrics: dict[str, float] = field(default_factory=dict)  # of the model after this round
    pre_clip_norms: dict[str, float] = field(default_factory=dict)  # only when not noised
    epsilon: dict[str, float] = field(default_factory=dict)  # ledger after this round


@dataclass
class RunResult:
    records: list[RoundRecord]
    rejected: dict[str, int]
    final_weights: Params
    final_model_bytes: int
    initial_metrics: dict[str, float]

    def mean_up(self) -> float:
        """Mean uplink bytes per gateway per round."""
        values = [b for r in self.records for b in r.up_bytes.values()]
        return float(np.mean(values)) if values else 0.0

    def mean_down(self) -> float:
        """Mean downlink bytes per gateway per round (model + announcement)."""
        values = [b for r in self.records for b in r.down_bytes.values()]
        return float(np.mean(values)) if values else 0.0


def wire_bytes(kind: Kind, body: msgspec.Struct, sender: str, round_: int, now: float) -> bytes:
    """The bytes a service would publish for ``body`` (unsigned envelope)."""
    env = codec.make_envelope(kind, FLEET, TASK, round_, sender, body, timestamp=now)
    return codec.encode(env)


def _unwrap(data: bytes, body_type: type) -> object:
    return codec.decode_body(codec.decode(data), body_type)


@dataclass
class _Gateway:
    name: str
    x: np.ndarray
    y: np.ndarray
    machine: edge.Participant
    rng: np.random.Generator


class InMemoryFederation:
    """Run ``config.rounds`` rounds of the real round protocol over ``dataset``'s units."""

    def __init__(
        self,
        dataset: FederatedDataset,
        spec: ModelSpec,
        config: RoundConfig,
        initial_weights: Params,
        *,
        seed: int = 0,
        ledger: Ledger | None = None,
        evaluate: EvaluateFn | None = None,
        now: float = 1_700_000_000.0,
    ) -> None:
        self.spec = spec
        self.now = now
        self.evaluate = evaluate
        self.server = agg.RoundStateMachine(
            config, spec, initial_weights, random.Random(seed), decode=decode_update, ledger=ledger
        )
        self.gateways: dict[str, _Gateway] = {}
        for i, (name, unit) in enumerate(dataset.units.items()):
            encoder = make_encoder(EdgePipelineState(), np.random.default_rng([seed, i, 1]))
            self.gateways[name] = _Gateway(
                name, unit.x_train, unit.y_train, edge.Participant(name, encode=encoder),
                np.random.default_rng([seed, i, 0]),
            )
        self.outbox: list[tuple[str, bytes]] = []
        self.records: list[RoundRecord] = []
        self.current = RoundRecord(round=1)
        self._open: dict[int, RoundRecord] = {}  # rounds announced past, summary not yet out
        self.final_model_bytes = 0
        self.final_weights: Params = [np.array(w) for w in initial_weights]
        self._held_version = -1
        self.finished = False
        self._pending_model_bytes = 0

    # ---- driving ------------------------------------------------------------------------

    def run(self) -> RunResult:
        initial = self.evaluate(self.final_weights) if self.evaluate else {}
        self._feed(agg.Started(self.now))
        for name in self.gateways:
            self._feed(agg.DeviceOnline(self.now, name))
        # A round closes once its last update is fed in; the loop ends with the run.
        while not self.finished:
            if not self.outbox:
                raise RuntimeError(f"round {self.current.round} stalled with no update in flight")
            self._flush()
        return RunResult(self.records, dict(self.server.rejected), self.final_weights,
                         self.final_model_bytes, initial)

    def _feed(self, event: agg.Event) -> None:
        for action in self.server.handle(event):
            if isinstance(action, agg.PublishModel):
                self._publish_model(action.model)
            elif isinstance(action, agg.PublishRound):
                self._publish_round(action.announcement)
            elif isinstance(action, agg.PublishMetrics):
                self._commit(action.summary.round, action.summary.epsilon)
            elif isinstance(action, agg.RunFinished):
                self.finished = True
                self.final_model_bytes = self._pending_model_bytes

    def _publish_model(self, model: GlobalModel) -> None:
        data = wire_bytes(Kind.MODEL, model, AGGREGATOR, model.round, self.now)
        self._pending_model_bytes = len(data)
        received = _unwrap(data, GlobalModel)
        assert isinstance(received, GlobalModel)
        # what the gateways hold (int8 / delta downlinks decode to the same weights)
        held = receive_model(received, self._held_version, self.final_weights)
        if held is not None:
            self.final_weights, self._held_version = held, received.version
        for g in self.gateways.values():
            self._deliver(g, edge.ModelReceived(self.now, received))

    def _publish_round(self, ann: RoundAnnouncement) -> None:
        data = wire_bytes(Kind.ROUND, ann, AGGREGATOR, ann.round, self.now)
        if self.current.round != ann.round:  # its summary follows this announcement
            self._open[self.current.round] = self.current
        self.current = RoundRecord(round=ann.round)
        # the model that this round trains on was published just before the announcement
        for name in self.gateways:
            self.current.down_bytes[name] = self._pending_model_bytes + len(data)
        received = _unwrap(data, RoundAnnouncement)
        assert isinstance(received, RoundAnnouncement)
        for g in self.gateways.values():
            self._deliver(g, edge.RoundAnnounced(self.now, received))

    def _commit(self, round_: int, epsilon: dict[str, float]) -> None:
        record = self._open.pop(round_, self.current if self.current.round == round_ else None)
        if record is None:
            raise RuntimeError(f"summary for round {round_} while recording {self.current.round}")
        # PublishModel of the new version precedes PublishMetrics: final_weights is it.
        record.metrics = self.evaluate(self.final_weights) if self.evaluate else {}
        record.epsilon = dict(epsilon)
        self.records.append(record)

    def _deliver(self, g: _Gateway, event: edge.Event) -> None:
        for action in g.machine.handle(event):
            if isinstance(action, edge.StartTraining):
                weights, result = train_local(self.spec, action.weights, g.x, g.y, action.train, g.rng)
                self._deliver(g, edge.TrainingFinished(
                    self.now, action.round, action.base_version, weights, result.num_samples,
                    result.loss, {}, action.lineage))
            elif isinstance(action, edge.PublishUpdate):
                data = wire_bytes(Kind.UPDATE, action.update, g.name, action.round, self.now)
                self.outbox.append((g.name, data))

    def _flush(self) -> None:
        batch, self.outbox = self.outbox, []
        for name, data in batch:
            env = codec.decode(data)
            update = codec.decode_body(env, ModelUpdate)
            if update.round == self.current.round:
                self.current.up_bytes[name] = len(data)
                if "update_bytes" in update.stats:  # the pipeline's own count of its output
                    self.current.delta_bytes[name] = int(update.stats["update_bytes"])
                if "pre_clip_norm" in update.stats:
                    self.current.pre_clip_norms[name] = update.stats["pre_clip_norm"]
            self._feed(agg.UpdateReceived(self.now, name, env.message_id, update, len(data)))


def run_federation(
    dataset: FederatedDataset,
    spec: ModelSpec,
    config: RoundConfig,
    initial_weights: Params,
    *,
    seed: int = 0,
    ledger: Ledger | None = None,
    evaluate: EvaluateFn | None = None,
) -> RunResult:
    """One run of ``config.rounds`` rounds; see :class:`InMemoryFederation`."""
    return InMemoryFederation(
        dataset, spec, config, initial_weights, seed=seed, ledger=ledger, evaluate=evaluate
    ).run()
