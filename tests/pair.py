"""In-memory wiring of one RoundStateMachine and several Participants (no broker).

Messages pass through the real codec (encode -> decode) so the pair tests exercise the
wire format too. Training is a stand-in that pulls each gateway's weights half-way towards
its own target, so FedAvg must converge to the sample-weighted mean of the targets.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from aggregator import rounds as agg
from edge import participant as edge
from fedcore.protocol import codec
from fedcore.protocol.messages import GlobalModel, Kind, ModelSpec, ModelUpdate, RoundAnnouncement

SPEC = ModelSpec(kind="mlp", layer_sizes=(2, 1))


def wire(kind: Kind, body, sender: str = "x", round_: int = 0):
    env = codec.make_envelope(kind, "fleet", "task", round_, sender, body, timestamp=0.0)
    return codec.decode(codec.encode(env))


@dataclass
class Gateway:
    name: str
    target: float
    samples: int
    machine: edge.Participant = field(init=False)
    online: bool = True

    def __post_init__(self) -> None:
        self.machine = edge.Participant(self.name)


class Federation:
    def __init__(self, gateways: list[Gateway], config: agg.RoundConfig, now: float = 1000.0,
                 weights: list[np.ndarray] | None = None, spec: ModelSpec = SPEC):
        self.now = now
        if weights is None:
            weights = [np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)]
        self.server = agg.RoundStateMachine(config, spec, weights, random.Random(0))
        self.gateways = {g.name: g for g in gateways}
        self.retained_round: RoundAnnouncement | None = None
        self.retained_model: GlobalModel | None = None
        self.actions: list = []
        self.outbox: list[tuple[str, edge.PublishUpdate]] = []
        self.model_bytes: list[int] = []  # encoded size of each published model envelope

    def start(self) -> None:
        self.feed(agg.Started(self.now))
        for g in self.gateways.values():
            self.feed(agg.DeviceOnline(self.now, g.name))

    def feed(self, event) -> None:
        for action in self.server.handle(event):
            self.actions.append(action)
            if isinstance(action, agg.PublishModel):
                env = codec.make_envelope(Kind.MODEL, "fleet", "task", 0, "x", action.model, timestamp=0.0)
                self.model_bytes.append(len(codec.encode(env)))
                self.retained_model = codec.decode_body(wire(Kind.MODEL, action.model), GlobalModel)
                for g in self.online():
                    self.deliver(g, edge.ModelReceived(self.now, self.retained_model))
            elif isinstance(action, agg.PublishRound):
                self.retained_round = codec.decode_body(
                    wire(Kind.ROUND, action.announcement), RoundAnnouncement)
                for g in self.online():
                    self.deliver(g, edge.RoundAnnounced(self.now, self.retained_round))

    def online(self) -> list[Gateway]:
        return [g for g in self.gateways.values() if g.online]

    def deliver(self, g: Gateway, event) -> None:
        for action in g.machine.handle(event):
            if isinstance(action, edge.StartTraining):
                trained = [w + 0.5 * (g.target - w) for w in action.weights]
                self.deliver(g, edge.TrainingFinished(
                    self.now, action.round, action.base_version, trained, g.samples, 0.1,
                    {"eval_loss": g.target}, action.lineage))
            elif isinstance(action, edge.PublishUpdate):
                self.outbox.append((g.name, action))

    def flush(self, drop: set[str] = frozenset(), hold: set[str] = frozenset()) -> None:
        """Deliver queued updates to the aggregator (QoS 1: may be delivered more than once).
        ``hold``: these gateways' updates stay queued (their link is down)."""
        batch, self.outbox = self.outbox, []
        for name, action in batch:
            if name in drop:
                continue
            if name in hold:
                self.outbox.append((name, action))
                continue
            env = wire(Kind.UPDATE, action.update, sender=name, round_=action.round)
            body = codec.decode_body(env, ModelUpdate)
            self.feed(agg.UpdateReceived(self.now, name, action.message_id, body, 100))

    def disconnect(self, g: Gateway) -> None:
        g.online = False
        self.feed(agg.DeviceOffline(self.now, g.name))

    def reconnect(self, g: Gateway) -> None:
        g.online = True
        self.feed(agg.DeviceOnline(self.now, g.name))
        if self.retained_model is not None:
            self.deliver(g, edge.ModelReceived(self.now, self.retained_model))
        if self.retained_round is not None:
            self.deliver(g, edge.RoundAnnounced(self.now, self.retained_round))

    def of(self, kind: type) -> list:
        return [a for a in self.actions if isinstance(a, kind)]
