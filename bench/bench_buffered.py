"""Synchronous vs buffered (FedBuff-style) rounds on a simulated intermittent fleet.

Theory of operation
-------------------
A discrete-event simulation with a simulated clock (seconds), driving the real pure state
machines: one ``aggregator.rounds.RoundStateMachine`` and one ``edge.participant.Participant``
per unit of a real data set (default: the 21 NASA battery cells), with real local training
(``train_local``) on each unit's own rows. No broker: what the broker does is modelled:

- **Links.** Each gateway's uplink alternates up and down on its own schedule: up for an
  exponential time of mean ``0.7 * P``, down for one of mean ``0.3 * P``, with its own period
  ``P`` drawn from ``--period`` (so ~30 % of the fleet is offline at any moment, each link
  on its own clock). A gateway starts down with probability 0.3.
- **Broker.** Going down sends the aggregator ``DeviceOffline`` (last will); coming up sends
  ``DeviceOnline`` and delivers the retained model and announcement. While a link is up,
  messages arrive after ``--latency`` seconds; updates published while it is down wait in
  the gateway's queue (persistent session, QoS 1) and go out when it comes back.
- **Training** takes a gateway-specific time drawn from ``--train-time`` (simulated; the
  real numpy training runs at once), whether or not the link is up.
- **Ticks** reach the aggregator every 5 s, for deadlines.

Figures: *time to target* is the simulated time until the global model's test metric
(RMSE on the pooled test rows, original scale) first reaches ``--target``; *work counted*
is the share of finished local trainings whose update the aggregator accepted (the rest was
discarded on the gateway as obsolete, or refused as late, stale or too stale).

Usage (the figures in bench/RESULTS.md come from this command)::

    python bench/bench_buffered.py [--dataset batteries] [--seeds 0 1 2 3 4] [--target 0.045]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from aggregator import rounds as agg
from aggregator.buffered import BufferedConfig
from edge import participant as edge
from fedcore.datasets import (
    FederatedDataset,
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.learning.models import init_params
from fedcore.learning.training import train_local
from fedcore.protocol.messages import GlobalModel, ModelSpec, RoundAnnouncement

OFFLINE_SHARE = 0.3
TICK_S = 5.0


@dataclass
class SimGateway:
    name: str
    x: np.ndarray
    y: np.ndarray
    machine: edge.Participant
    rng: np.random.Generator
    link_rng: random.Random  # its link schedule: the same in both modes for one seed
    period: float
    train_s: float
    up: bool = True
    queue: list[edge.PublishUpdate] = field(default_factory=list)


@dataclass
class Outcome:
    mode: str
    seed: int
    time_to_target: float | None  # simulated seconds, None if never within the horizon
    versions_to_target: int | None
    trainings: int
    accepted: int
    rejected: dict[str, int]
    versions: int
    final_metric: float
    offline_share: float  # measured: mean share of gateways down at the sampled instants

    @property
    def counted(self) -> float:
        return self.accepted / self.trainings if self.trainings else 0.0


class Simulation:
    """One run: a fleet, one aggregator config, one seed, until the target or the horizon."""

    def __init__(self, ds: FederatedDataset, spec: ModelSpec, config: agg.RoundConfig, *,
                 seed: int, target: float, horizon: float, period: tuple[float, float],
                 train_time: tuple[float, float], latency: float) -> None:
        self.ds, self.spec, self.target, self.horizon, self.latency = ds, spec, target, horizon, latency
        self.now = 0.0
        weights = init_params(spec, np.random.default_rng(seed))
        self.server = agg.RoundStateMachine(config, spec, weights, random.Random(seed))
        self.events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self.gateways: dict[str, SimGateway] = {}
        for i, (name, unit) in enumerate(ds.units.items()):
            link_rng = random.Random(f"{seed}/{name}")
            self.gateways[name] = SimGateway(
                name, unit.x_train, unit.y_train, edge.Participant(name),
                np.random.default_rng([seed, i]), link_rng, link_rng.uniform(*period),
                link_rng.uniform(*train_time), up=link_rng.random() >= OFFLINE_SHARE)
        self.retained_model: GlobalModel | None = None
        self.retained_round: RoundAnnouncement | None = None
        self.trainings = 0
        self.accepted = 0
        self.metric_at: list[tuple[float, int, float]] = []  # (time, version, rmse)
        self.down_samples: list[float] = []
        self.finished = False

    # ---- the event loop ----------------------------------------------------------------

    def at(self, when: float, kind: str, payload: Any = None) -> None:
        self._seq += 1
        heapq.heappush(self.events, (when, self._seq, kind, payload))

    def run(self) -> None:
        self.feed(agg.Started(self.now))
        for g in self.gateways.values():
            if g.up:
                self.feed(agg.DeviceOnline(self.now, g.name))
            self.at(self._link_time(g), "link", g.name)
        self.at(TICK_S, "tick")
        for g in self.gateways.values():
            if g.up:
                self.deliver_retained(g)
        while self.events and not self.finished:
            when, _, kind, payload = heapq.heappop(self.events)
            if when > self.horizon:
                break
            self.now = when
            if kind == "tick":
                self.down_samples.append(sum(not g.up for g in self.gateways.values()) / len(self.gateways))
                self.feed(agg.Tick(self.now))
                self.at(self.now + TICK_S, "tick")
            elif kind == "link":
                self.toggle(self.gateways[payload])
            elif kind == "trained":
                name, event = payload
                self.trainings += 1
                self.handle(self.gateways[name], event)
            elif kind == "update":
                name, action = payload
                self.feed(agg.UpdateReceived(self.now, name, action.message_id, action.update, 0))
            elif kind == "to_gateway":
                name, event = payload
                if self.gateways[name].up:  # lost if the link went down in between: retained
                    self.handle(self.gateways[name], event)

    def _link_time(self, g: SimGateway) -> float:
        mean = g.period * (OFFLINE_SHARE if not g.up else 1 - OFFLINE_SHARE)
        return self.now + g.link_rng.expovariate(1.0 / mean)

    def toggle(self, g: SimGateway) -> None:
        g.up = not g.up
        if g.up:
            self.feed(agg.DeviceOnline(self.now, g.name))
            self.deliver_retained(g)
            queued, g.queue = g.queue, []
            for action in queued:
                self.at(self.now + self.latency, "update", (g.name, action))
        else:
            self.feed(agg.DeviceOffline(self.now, g.name))
        self.at(self._link_time(g), "link", g.name)

    def deliver_retained(self, g: SimGateway) -> None:
        if self.retained_model is not None:
            self.at(self.now + self.latency, "to_gateway", (g.name, edge.ModelReceived(self.now, self.retained_model)))
        if self.retained_round is not None:
            self.at(self.now + self.latency, "to_gateway", (g.name, edge.RoundAnnounced(self.now, self.retained_round)))

    # ---- the aggregator's and the gateways' actions ------------------------------------

    def feed(self, event: agg.Event) -> None:
        for action in self.server.handle(event):
            if isinstance(action, agg.PublishModel):
                self.retained_model = action.model
                self.broadcast(edge.ModelReceived(self.now, action.model))
            elif isinstance(action, agg.PublishRound):
                self.retained_round = action.announcement
                self.broadcast(edge.RoundAnnounced(self.now, action.announcement))
            elif isinstance(action, agg.UpdateAccepted):
                self.accepted += 1
            elif isinstance(action, agg.ModelCommitted):
                report = evaluate_dataset(self.ds, self.spec, self.server.weights)
                self.metric_at.append((self.now, action.version, report["rmse"]))
                if report["rmse"] <= self.target:
                    self.finished = True
            elif isinstance(action, agg.RunFinished):
                self.finished = True

    def broadcast(self, event: edge.Event) -> None:
        for g in self.gateways.values():
            if g.up:
                self.at(self.now + self.latency, "to_gateway", (g.name, event))

    def handle(self, g: SimGateway, event: edge.Event) -> None:
        for action in g.machine.handle(event):
            if isinstance(action, edge.StartTraining):
                weights, result = train_local(self.spec, action.weights, g.x, g.y, action.train, g.rng)
                done: edge.Event = edge.TrainingFinished(
                    self.now, action.round, action.base_version, weights, result.num_samples,
                    result.loss, {}, action.lineage)
                if not np.isfinite(result.loss) or not all(np.isfinite(w).all() for w in weights):
                    # as edge/runtime.py does: a diverged training sits out, nothing is sent
                    done = edge.TrainingFailed(self.now, action.round, "training diverged")
                jitter = float(g.rng.uniform(0.8, 1.2))
                self.at(self.now + g.train_s * jitter, "trained", (g.name, done))
            elif isinstance(action, edge.PublishUpdate):
                if g.up:
                    self.at(self.now + self.latency, "update", (g.name, action))
                else:
                    g.queue.append(action)

    def outcome(self, mode: str, seed: int) -> Outcome:
        reached = next(((t, v) for t, v, m in self.metric_at if m <= self.target), None)
        return Outcome(
            mode, seed, reached[0] if reached else None, reached[1] if reached else None,
            self.trainings, self.accepted, dict(self.server.rejected), self.server.version,
            self.metric_at[-1][2] if self.metric_at else float("nan"),
            statistics.fmean(self.down_samples) if self.down_samples else 0.0)


def config_for(mode: str, args: argparse.Namespace, train: Any) -> agg.RoundConfig:
    buffered = BufferedConfig(args.buffer_size, args.max_staleness, args.staleness_exponent)
    return agg.RoundConfig(rounds=0, min_participants=args.min_participants,
                           round_timeout_s=args.round_timeout, train=train, mode=mode,
                           buffered=buffered if mode == "buffered" else BufferedConfig())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="batteries")
    parser.add_argument("--gateways", type=int, default=None)
    parser.add_argument("--target", type=float, default=0.045, help="RMSE to reach")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--horizon", type=float, default=6 * 3600.0, help="simulated seconds")
    parser.add_argument("--period", type=float, nargs=2, default=[600.0, 3600.0],
                        help="range of each link's mean up+down cycle, seconds")
    parser.add_argument("--train-time", type=float, nargs=2, default=[20.0, 120.0],
                        help="range of each gateway's local training time, seconds")
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--round-timeout", type=float, default=300.0)
    parser.add_argument("--min-participants", type=int, default=2)
    parser.add_argument("--buffer-size", type=int, default=10)
    parser.add_argument("--max-staleness", type=int, default=5)
    parser.add_argument("--staleness-exponent", type=float, default=0.5)
    args = parser.parse_args()
    ds = load_dataset(args.dataset, gateways=args.gateways)
    spec, train = default_spec(ds), default_train_config(ds)
    print(f"{args.dataset}: {len(ds.units)} gateways, target RMSE {args.target}, "
          f"K {args.buffer_size}, max_staleness {args.max_staleness}, "
          f"exponent {args.staleness_exponent}, horizon {args.horizon:.0f} s")
    print("| mode | seed | time to target (sim s) | versions | work counted | trainings | "
          "refused | final RMSE | offline share |")
    print("|---|---|---|---|---|---|---|---|---|")
    results: dict[str, list[Outcome]] = {"sync": [], "buffered": []}
    for seed in args.seeds:
        for mode in ("sync", "buffered"):
            sim = Simulation(ds, spec, config_for(mode, args, train), seed=seed, target=args.target,
                             horizon=args.horizon, period=tuple(args.period),
                             train_time=tuple(args.train_time), latency=args.latency)
            sim.run()
            out = sim.outcome(mode, seed)
            results[mode].append(out)
            refused = ", ".join(f"{k} {v}" for k, v in sorted(Counter(out.rejected).items())) or "-"
            reached = f"{out.time_to_target:.0f}" if out.time_to_target is not None else "not reached"
            print(f"| {mode} | {seed} | {reached} | {out.versions_to_target or out.versions} | "
                  f"{out.counted:.0%} | {out.trainings} | {refused} | {out.final_metric:.4f} | "
                  f"{out.offline_share:.0%} |", flush=True)
    for mode, outs in results.items():
        times = [o.time_to_target for o in outs if o.time_to_target is not None]
        median = f"{statistics.median(times):.0f} s" if len(times) == len(outs) else "not always reached"
        print(f"{mode}: median time to target {median}; work counted "
              f"{statistics.fmean(o.counted for o in outs):.0%} (mean of {len(outs)} seeds)")


if __name__ == "__main__":
    main()
