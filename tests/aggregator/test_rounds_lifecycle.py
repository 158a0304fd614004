"""Pure tests of the round machine's life: lineage, statistics round, readiness, schedule,
rounds = 0, continuing after a restore, incompatible state, validation, bounded history.

One machine, events fed by hand: no broker, no participants (tests/pair.py wires those).
"""

from __future__ import annotations

import datetime as dt
import math
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np
import pytest

from aggregator import rounds as agg
from aggregator.schedule import Schedule, parse_window
from edge.participant import encode_raw
from fedcore.learning.params import Params
from fedcore.protocol.codec import body_hash
from fedcore.protocol.lineage import is_lineage
from fedcore.protocol.messages import DataStats, ModelSpec, ModelUpdate, PipelineConfig

T0 = 1_750_000_000.0  # 2025-06-15 15:06:40 UTC
SPEC = ModelSpec("mlp", (2, 1), features=("temp", "flow"), target="power")


def zeros() -> Params:
    return [np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)]


@dataclass
class FuseSpy:
    """FedAvg that remembers what it was given."""

    calls: list[tuple[list[Params], list[float]]] = field(default_factory=list)

    def __call__(self, updates: list[Params], weights: list[float], held: Params) -> Params:
        self.calls.append((updates, weights))
        return agg.fedavg(updates, weights, held)


class Driver:
    """Feeds one RoundStateMachine and keeps every action it returned."""

    def __init__(self, config: agg.RoundConfig, spec: ModelSpec = SPEC, now: float = T0) -> None:
        self.now = now
        self.fuse = FuseSpy()
        self.machine = agg.RoundStateMachine(config, spec, zeros(), random.Random(0), fuse=self.fuse)
        self.actions: list[Any] = []
        self._ids = 0

    def feed(self, event: agg.Event) -> list[Any]:
        actions = self.machine.handle(event)
        self.actions.extend(actions)
        return actions

    def start(self) -> list[Any]:
        return self.feed(agg.Started(self.now))

    def online(self, device: str, ready: bool = True, rows_new: int = 0) -> list[Any]:
        return self.feed(agg.DeviceOnline(self.now, device, ready, rows_new))

    def tick(self, now: float) -> list[Any]:
        self.now = now
        return self.feed(agg.Tick(now))

    def update(self, device: str, value: float = 1.0, samples: int = 100, train_loss: float = 0.1,
               stats: dict[str, float] | None = None, round_: int | None = None) -> list[Any]:
        m = self.machine
        delta, _ = encode_raw([np.full((2, 1), value, np.float32), np.full((1,), value, np.float32)],
                              PipelineConfig())
        update = ModelUpdate(round=m.round if round_ is None else round_, base_version=m.version,
                             num_samples=samples, delta=delta, train_loss=train_loss,
                             stats={"eval_rmse": 0.5} if stats is None else stats)
        self._ids += 1
        return self.feed(agg.UpdateReceived(self.now, device, f"m{self._ids}", update, 100))

    def stats(self, device: str, rows: np.ndarray, lineage: str | None = None) -> list[Any]:
        data = np.asarray(rows, np.float64)
        answer = DataStats(self.machine.lineage if lineage is None else lineage,
                           ("temp", "flow", "power"), int(data.shape[0]),
                           tuple(float(v) for v in data.sum(axis=0)),
                           tuple(float(v) for v in np.square(data - data.mean(axis=0)).sum(axis=0)))
        return self.feed(agg.StatsReceived(self.now, device, answer))

    def run_round(self, devices: tuple[str, ...] = ("gw1", "gw2")) -> list[Any]:
        out: list[Any] = []
        for device in devices:
            out += self.update(device)
        return out

    def of(self, kind: type, actions: list[Any] | None = None) -> list[Any]:
        return [a for a in (self.actions if actions is None else actions) if isinstance(a, kind)]

    def last_checkpoint(self) -> agg.Checkpoint:
        return self.of(agg.SaveCheckpoint)[-1].checkpoint


def kinds(actions: list[Any]) -> list[type]:
    return [type(a) for a in actions]


def rows(seed: int, n: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal([60.0, 12.0, 300.0], [5.0, 2.0, 40.0], size=(n, 3))


def federated(**changes: Any) -> agg.RoundConfig:
    return agg.RoundConfig(**{"rounds": 3, "min_participants": 2, "scaling": "federated", **changes})


# ---- lineage -------------------------------------------------------------------------------------


def test_a_fresh_machine_names_a_lineage_that_every_message_carries() -> None:
    d = Driver(agg.RoundConfig(rounds=3, min_participants=2))
    started = d.start()
    (lineage,) = d.of(agg.LineageStarted, started)
    assert is_lineage(lineage.lineage) and lineage.statistics is False
    assert lineage.lineage.startswith("20250615T150640Z-")
    d.online("gw1")
    d.online("gw2")
    for _ in range(3):
        d.run_round()
    assert d.of(agg.RunFinished)
    models = [a.model for a in d.of(agg.PublishModel)]
    rounds = [a.announcement for a in d.of(agg.PublishRound)]
    summaries = [a.summary for a in d.of(agg.PublishMetrics)]
    assert [m.version for m in models] == [0, 1, 2, 3]
    assert len(rounds) == 3 and len(summaries) == 3
    assert {m.lineage for m in models} | {r.lineage for r in rounds} | {s.lineage for s in summaries} \
        == {lineage.lineage}
    assert d.last_checkpoint().meta["lineage"] == lineage.lineage


def test_a_restored_machine_keeps_its_lineage() -> None:
    d = Driver(agg.RoundConfig(rounds=3, min_participants=1))
    d.start()
    d.online("gw1")
    lineage = d.machine.lineage
    again = Driver(d.machine.config, now=T0 + 100)
    again.machine.restore(d.last_checkpoint())
    assert again.of(agg.LineageStarted, again.start()) == []
    assert again.machine.lineage == lineage
    assert again.of(agg.PublishModel)[0].model.lineage == lineage


# ---- the statistics round ---------------------------------------------------------------------------


def test_federated_scaling_opens_with_a_statistics_round_and_no_model() -> None:
    d = Driver(federated())
    started = d.start()
    assert kinds(started) == [agg.LineageStarted, agg.SaveCheckpoint, agg.PublishRound]
    assert started[0].statistics is True
    announcement = started[-1].announcement
    assert (announcement.round, announcement.purpose, announcement.model_version) == (0, "statistics", -1)
    assert announcement.lineage == d.machine.lineage
    assert d.machine.phase is agg.Phase.STATISTICS
    d.online("gw1")
    d.online("gw2")
    # a broker that lost its retained messages gets the round again, still no model
    assert kinds(d.feed(agg.BrokerSessionLost(d.now))) == [agg.PublishRound]
    assert d.of(agg.PublishModel) == []


def test_stats_from_every_ready_gateway_give_the_model_its_fleet_scaler() -> None:
    d = Driver(federated())
    d.start()
    d.online("gw1")
    d.online("gw2")
    a, b = rows(1, 40), rows(2, 160)
    assert d.stats("gw1", a) == []  # gw2 has not answered
    closed = d.stats("gw2", b)
    (fitted,) = d.of(agg.ScalerFitted, closed)
    assert fitted.devices == ("gw1", "gw2") and fitted.rows == 200
    (published,) = d.of(agg.PublishModel, closed)
    spec = published.model.spec
    both = np.vstack([a, b])
    np.testing.assert_allclose(spec.feature_mean, both[:, :2].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(spec.feature_std, both[:, :2].std(axis=0), rtol=1e-9)
    assert spec.target_mean == pytest.approx(both[:, 2].mean(), rel=1e-12)
    assert spec.target_std == pytest.approx(both[:, 2].std(), rel=1e-9)
    assert published.model.version == 0 and published.model.lineage == d.machine.lineage
    (train,) = d.of(agg.PublishRound, closed)
    assert (train.announcement.round, train.announcement.purpose) == (1, "train")
    assert d.machine.phase is agg.Phase.COLLECTING
    # every later model carries the same scaler
    d.run_round()
    assert d.of(agg.PublishModel)[-1].model.spec == spec


@pytest.mark.parametrize("schedule", [Schedule(), Schedule(min_new_rows=10**6)],
                         ids=["next_round_at_once", "next_round_waits"])
def test_the_fitted_scaler_is_checkpointed_before_the_model_is_published(schedule: Schedule) -> None:
    # a restart must not re-run the statistics round (and publish another version 0 with
    # another scaler) after the gateways received the model
    d = Driver(federated(schedule=schedule))
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.stats("gw1", rows(1, 40))
    closed = d.stats("gw2", rows(2, 40))
    publish = next(i for i, a in enumerate(closed) if isinstance(a, agg.PublishModel))
    saved = [a.checkpoint for a in closed[:publish] if isinstance(a, agg.SaveCheckpoint)]
    assert saved, f"no checkpoint before the model: {[t.__name__ for t in kinds(closed)]}"
    assert msgspec.convert(saved[-1].meta["spec"], ModelSpec) == closed[publish].model.spec


def test_a_restart_during_the_statistics_round_asks_again_in_the_same_lineage() -> None:
    d = Driver(federated())
    d.start()
    d.online("gw1")
    d.stats("gw1", rows(1, 30))
    again = Driver(d.machine.config, now=T0 + 100)
    again.machine.restore(d.last_checkpoint())
    started = again.start()
    assert kinds(started) == [agg.SaveCheckpoint, agg.PublishRound]
    assert started[1].announcement.purpose == "statistics"
    assert started[1].announcement.lineage == d.machine.lineage


def test_a_gateway_not_ready_is_not_waited_for_in_the_statistics_round() -> None:
    d = Driver(federated())
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.online("gw3", ready=False)  # waiting for data: it will not answer
    d.stats("gw1", rows(1, 30))
    closed = d.stats("gw2", rows(2, 30))
    assert d.of(agg.ScalerFitted, closed)[0].devices == ("gw1", "gw2")


def test_a_gateway_that_becomes_ready_is_waited_for_in_the_statistics_round() -> None:
    d = Driver(federated())
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.online("gw3", ready=False)
    d.stats("gw1", rows(1, 30))
    d.online("gw3", ready=True)  # it has enough rows now
    assert d.stats("gw2", rows(2, 30)) == []
    assert d.of(agg.ScalerFitted, d.stats("gw3", rows(3, 30)))[0].devices == ("gw1", "gw2", "gw3")


def test_bad_statistics_are_rejected_and_not_waited_for() -> None:
    d = Driver(federated())
    d.start()
    d.online("gw1")
    d.online("gw2")
    (rejected,) = d.stats("gw2", rows(2, 30), lineage="20200101T000000Z-0000")
    assert (rejected.device, rejected.round, rejected.reason) == ("gw2", 0, "wrong_lineage")
    # quorum: one good answer is short of min_participants = 2 until the deadline
    assert d.stats("gw1", rows(1, 30)) == []
    assert d.stats("gw1", rows(1, 30))[0].reason == "duplicate_device"
    assert d.machine.rejected == {"wrong_lineage": 1, "duplicate_device": 1}


def test_the_statistics_deadline_fits_with_a_quorum_or_re_announces() -> None:
    d = Driver(federated(min_participants=2, round_timeout_s=60))
    d.start()
    for name in ("gw1", "gw2", "gw3"):
        d.online(name)
    d.stats("gw1", rows(1, 30))
    missed = d.tick(T0 + 60)
    assert kinds(missed) == [agg.QuorumMissed, agg.PublishRound]
    assert (missed[0].round, missed[0].received, missed[0].needed) == (0, 1, 2)
    assert missed[1].announcement.purpose == "statistics"
    d.stats("gw2", rows(2, 30))  # gw3 is still silent
    closed = d.tick(T0 + 120)
    assert d.of(agg.ScalerFitted, closed)[0].devices == ("gw1", "gw2")


def test_stats_outside_a_statistics_round_are_late() -> None:
    d = Driver(agg.RoundConfig(rounds=2, min_participants=1))
    d.start()
    d.online("gw1")
    (rejected,) = d.stats("gw1", rows(1, 10))
    assert rejected.reason == "late"


# ---- readiness in training rounds ----------------------------------------------------------------


def test_a_gateway_not_ready_is_not_waited_for_and_counts_again_once_ready() -> None:
    d = Driver(agg.RoundConfig(rounds=5, min_participants=2, round_timeout_s=600))
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.online("gw3", ready=False)
    closed = d.run_round(("gw1", "gw2"))
    assert d.of(agg.PublishMetrics, closed)[0].summary.participants == ("gw1", "gw2")
    d.online("gw3", ready=True, rows_new=400)
    assert d.run_round(("gw1", "gw2")) == [agg.UpdateAccepted("gw1", 2, 100),
                                           agg.UpdateAccepted("gw2", 2, 100)]
    closed = d.update("gw3")
    assert d.of(agg.PublishMetrics, closed)[0].summary.participants == ("gw1", "gw2", "gw3")
    # not ready again (e.g. its data stopped): the next round does not wait for it
    d.online("gw3", ready=False)
    closed = d.run_round(("gw1", "gw2"))
    assert d.of(agg.PublishMetrics, closed)[0].summary.round == 3


def test_a_gateway_turning_not_ready_mid_round_closes_the_round() -> None:
    d = Driver(agg.RoundConfig(rounds=5, min_participants=2))
    d.start()
    for name in ("gw1", "gw2", "gw3"):
        d.online(name)
    d.run_round(("gw1", "gw2"))
    assert d.machine.round == 1
    closed = d.online("gw3", ready=False)
    assert d.of(agg.PublishMetrics, closed)[0].summary.participants == ("gw1", "gw2")


# ---- the schedule ------------------------------------------------------------------------------------


def test_the_interval_puts_the_machine_in_waiting_until_a_tick_allows_the_round() -> None:
    d = Driver(agg.RoundConfig(rounds=3, min_participants=2, schedule=Schedule(interval_s=600)))
    d.start()
    d.online("gw1")
    d.online("gw2")
    assert d.of(agg.PublishRound)[0].announcement.round == 1  # the first round is not held back
    d.now = T0 + 30
    committed = d.run_round()
    (waiting,) = d.of(agg.RoundWaiting, committed)
    assert waiting.round == 2 and waiting.reason.startswith("interval: next round at")
    # the committed round's retained announcement is replaced by one that says "wait"
    (wait,) = d.of(agg.PublishRound, committed)
    assert (wait.announcement.purpose, wait.announcement.round) == ("wait", 2)
    assert d.machine.phase is agg.Phase.WAITING and d.machine.next_check == T0 + 600
    assert d.tick(T0 + 599) == []
    assert d.update("gw1")[0].reason == "late"  # nothing is collected while waiting
    started = d.tick(T0 + 600)
    assert kinds(started) == [agg.SaveCheckpoint, agg.PublishRound]
    assert started[1].announcement.round == 2 and d.machine.phase is agg.Phase.COLLECTING


def test_a_time_window_holds_the_round_until_it_opens() -> None:
    schedule = Schedule(windows=(parse_window("22:00-06:00"),), timezone="Europe/Berlin")
    d = Driver(agg.RoundConfig(rounds=2, min_participants=1, schedule=schedule))
    started = d.start()  # 17:06 in Berlin
    assert kinds(started) == [agg.LineageStarted, agg.PublishModel, agg.RoundWaiting, agg.PublishRound]
    assert "outside the allowed windows" in started[2].reason
    assert started[3].announcement.purpose == "wait"
    opening = dt.datetime(2025, 6, 15, 22, 0, tzinfo=dt.timezone(dt.timedelta(hours=2))).timestamp()
    assert d.machine.next_check == opening
    d.online("gw1")
    assert d.tick(opening - 1) == []
    assert d.of(agg.PublishRound, d.tick(opening))[0].announcement.round == 1


def test_min_new_rows_waits_for_ready_gateways_rows() -> None:
    d = Driver(agg.RoundConfig(rounds=3, min_participants=1, schedule=Schedule(min_new_rows=100)))
    started = d.start()
    assert started[-2] == agg.RoundWaiting(1, "new rows: 0 of 100")
    assert d.online("gw1", rows_new=60) == [agg.RoundWaiting(1, "new rows: 60 of 100")]
    assert d.online("gw2", ready=False, rows_new=500) == []  # not ready: its rows do not count
    assert d.tick(T0 + 3600) == []  # the clock alone cannot change the answer
    announced = d.online("gw3", rows_new=40)
    assert d.of(agg.PublishRound, announced)[0].announcement.round == 1


def test_rows_used_by_a_round_do_not_start_the_next() -> None:
    # gw1 reported 150 new rows and trained round 1 on them; no status has come since
    d = Driver(agg.RoundConfig(rounds=5, min_participants=1, schedule=Schedule(min_new_rows=100)))
    d.start()
    d.online("gw1", rows_new=150)
    assert d.machine.phase is agg.Phase.COLLECTING
    committed = d.update("gw1")
    assert d.of(agg.PublishMetrics, committed)
    assert [a.announcement.purpose for a in d.of(agg.PublishRound, committed)] == ["wait"], \
        "round 2 announced on rows round 1 used"
    assert d.of(agg.RoundWaiting, committed) == [agg.RoundWaiting(2, "new rows: 0 of 100")]


def test_a_restart_mid_round_re_announces_that_round_despite_the_interval() -> None:
    config = agg.RoundConfig(rounds=3, min_participants=2, schedule=Schedule(interval_s=3600))
    d = Driver(config)
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.update("gw1")  # round 1 is under way when the aggregator stops
    again = Driver(config, now=T0 + 60)
    again.machine.restore(d.last_checkpoint())
    started = again.start()
    announced = again.of(agg.PublishRound, started)
    assert announced and announced[0].announcement.round == 1, kinds(started)


# ---- rounds = 0, continuing a finished run --------------------------------------------------------


def test_rounds_zero_never_finishes() -> None:
    d = Driver(agg.RoundConfig(rounds=0, min_participants=2, keep_history=10))
    d.start()
    d.online("gw1")
    d.online("gw2")
    for _ in range(40):
        d.run_round()
    assert d.of(agg.RunFinished) == []
    assert d.machine.phase is agg.Phase.COLLECTING
    assert (d.machine.round, d.machine.version) == (41, 40)


def finished_run(rounds: int = 2) -> Driver:
    d = Driver(agg.RoundConfig(rounds=rounds, min_participants=2))
    d.start()
    d.online("gw1")
    d.online("gw2")
    for _ in range(rounds):
        d.run_round()
    assert d.of(agg.RunFinished) == [agg.RunFinished(rounds, rounds)]
    assert d.last_checkpoint().meta["phase"] == "finished"
    return d


def test_a_finished_run_restored_with_more_rounds_continues() -> None:
    before = finished_run(rounds=2)
    last_model = before.of(agg.PublishModel)[-1].model
    after = Driver(agg.RoundConfig(rounds=4, min_participants=2), now=T0 + 500)
    after.machine.restore(before.last_checkpoint())
    started = after.start()
    assert kinds(started) == [agg.RunContinued, agg.PublishModel, agg.SaveCheckpoint, agg.PublishRound,
                              agg.PublishMetrics]
    assert started[4].again and started[4].summary.round == 2  # the last summary, once more
    assert started[0] == agg.RunContinued(3, 2)
    assert started[1].model == last_model  # the same version 2, same parent
    assert (started[3].announcement.round, started[3].announcement.model_version) == (3, 2)
    assert started[3].announcement.lineage == before.machine.lineage
    after.online("gw1")
    after.online("gw2")
    after.run_round()
    after.run_round()
    assert after.of(agg.RunFinished) == [agg.RunFinished(4, 4)]
    # the version chain runs on across the restart
    chain = [a.model for a in before.of(agg.PublishModel)] + \
        [a.model for a in after.of(agg.PublishModel)][1:]
    assert [m.version for m in chain] == [0, 1, 2, 3, 4]
    for parent, child in zip(chain, chain[1:], strict=False):
        assert child.parent_hash == body_hash(parent)
    assert {m.lineage for m in chain} == {before.machine.lineage}


def test_a_finished_run_restored_with_as_many_rounds_stays_finished() -> None:
    before = finished_run(rounds=2)
    after = Driver(agg.RoundConfig(rounds=2, min_participants=2), now=T0 + 500)
    after.machine.restore(before.last_checkpoint())
    assert kinds(after.start()) == [agg.PublishModel, agg.PublishMetrics, agg.RunFinished]
    assert after.update("gw1", round_=3)[0].reason == "finished"


def test_a_finished_run_restored_with_rounds_zero_continues() -> None:
    before = finished_run(rounds=2)
    after = Driver(agg.RoundConfig(rounds=0, min_participants=2), now=T0 + 500)
    after.machine.restore(before.last_checkpoint())
    assert after.start()[0] == agg.RunContinued(3, 2)


# ---- incompatible state ---------------------------------------------------------------------------


@pytest.mark.parametrize(("changed", "named"), [
    (ModelSpec("mlp", (2, 1), features=("temp", "pressure"), target="power"), "features"),
    (ModelSpec("mlp", (2, 1), features=("temp", "flow"), target="energy"), "target"),
    (ModelSpec("mlp", (2, 1), activation="tanh", features=("temp", "flow"), target="power"),
     "activation"),
])
def test_a_checkpoint_of_another_model_is_incompatible(changed: ModelSpec, named: str) -> None:
    d = Driver(agg.RoundConfig(rounds=2, min_participants=1))
    d.start()
    fresh = agg.RoundStateMachine(d.machine.config, changed, zeros(), random.Random(0))
    with pytest.raises(agg.IncompatibleState, match=named):
        fresh.restore(d.last_checkpoint())


def test_a_checkpoint_of_another_architecture_is_incompatible() -> None:
    d = Driver(agg.RoundConfig(rounds=2, min_participants=1))
    d.start()
    bigger = ModelSpec("mlp", (2, 4, 1), features=("temp", "flow"), target="power")
    weights = [np.zeros((2, 4), np.float32), np.zeros((4,), np.float32),
               np.zeros((4, 1), np.float32), np.zeros((1,), np.float32)]
    fresh = agg.RoundStateMachine(d.machine.config, bigger, weights, random.Random(0))
    with pytest.raises(agg.IncompatibleState, match="layer_sizes"):
        fresh.restore(d.last_checkpoint())


def test_a_checkpoint_with_the_lineages_scaler_is_compatible() -> None:
    d = Driver(federated(min_participants=1))
    d.start()
    d.online("gw1")
    d.stats("gw1", rows(1, 30))
    saved = d.last_checkpoint()
    fresh = agg.RoundStateMachine(d.machine.config, SPEC, zeros(), random.Random(0))
    fresh.restore(saved)  # the configured spec has no scaler: the lineage's is kept
    assert fresh.spec == d.machine.spec and fresh.spec.has_scaler


# ---- validation before fusion -----------------------------------------------------------------------


BAD_UPDATES: list[tuple[str, dict[str, Any], str]] = [
    ("zero", {"samples": 0}, "bad_samples"),
    ("negative", {"samples": -5}, "bad_samples"),
    ("huge", {"samples": 10**9 + 1}, "bad_samples"),
    ("many_stats", {"stats": {f"s{i}": 1.0 for i in range(agg.MAX_STATS + 1)}}, "bad_stats"),
    ("nan_stat", {"stats": {"eval_rmse": math.nan}}, "bad_stats"),
    ("inf_stat", {"stats": {"eval_rmse": math.inf}}, "bad_stats"),
    ("long_key", {"stats": {"k" * (agg.MAX_STAT_KEY + 1): 1.0}}, "bad_stats"),
    ("nan_loss", {"train_loss": math.nan}, "bad_stats"),
    ("inf_loss", {"train_loss": -math.inf}, "bad_stats"),
]


def test_bad_samples_and_bad_stats_are_rejected_and_never_fused() -> None:
    d = Driver(agg.RoundConfig(rounds=1, min_participants=1))
    d.start()
    d.online("good")
    for name, _, _ in BAD_UPDATES:
        d.online(name)
    for name, changes, reason in BAD_UPDATES:
        (rejected,) = d.update(name, value=1000.0, **changes)
        assert (rejected.device, rejected.reason) == (name, reason), name
    assert d.fuse.calls == []
    closed = d.update("good", value=2.0, samples=10**9)  # the largest honest count
    (updates, weights), = d.fuse.calls
    assert weights == [1e9] and len(updates) == 1
    np.testing.assert_allclose(updates[0][0], 2.0)
    assert d.of(agg.PublishMetrics, closed)[0].summary.participants == ("good",)
    assert d.machine.rejected == {"bad_samples": 3, "bad_stats": 6}


def test_a_rejected_gateway_is_not_waited_for() -> None:
    d = Driver(agg.RoundConfig(rounds=2, min_participants=1))
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.update("gw2", samples=0)
    closed = d.update("gw1")
    assert d.of(agg.PublishMetrics, closed)[0].summary.participants == ("gw1",)


# ---- bounded history ------------------------------------------------------------------------------------


def test_history_stays_bounded_over_many_rounds() -> None:
    d = Driver(agg.RoundConfig(rounds=0, min_participants=2, keep_history=10))
    d.start()
    d.online("gw1")
    d.online("gw2")
    for _ in range(60):
        d.run_round()
    history = d.machine.history
    assert len(history) == 10
    assert [h["round"] for h in history] == list(range(51, 61))
    assert len(d.last_checkpoint().meta["history"]) == 10
    # a longer saved history is cut on restore
    small = Driver(agg.RoundConfig(rounds=0, min_participants=2, keep_history=4))
    small.machine.restore(d.last_checkpoint())
    assert [h["round"] for h in small.machine.history] == [57, 58, 59, 60]


def test_a_checkpoint_is_not_changed_by_later_rounds() -> None:
    # the runtime holds a checkpoint it could not write (full disk) and writes it later
    d = Driver(agg.RoundConfig(rounds=0, min_participants=2, keep_history=10))
    d.start()
    d.online("gw1")
    d.online("gw2")
    d.run_round()
    saved = d.last_checkpoint()
    before = [dict(h) for h in saved.meta["history"]], dict(saved.meta["rejected"])
    d.update("gw1", samples=0)  # a rejection, then two more rounds
    d.run_round()
    d.run_round()
    assert ([dict(h) for h in saved.meta["history"]], dict(saved.meta["rejected"])) == before


# ---- commits vs re-publications, scaling kept by a lineage ----------------------------------------


def test_only_a_round_commits_a_version_re_publications_do_not() -> None:
    d = Driver(agg.RoundConfig(rounds=0, min_participants=1, downlink="delta"))
    d.start()
    d.online("a")
    d.update("a")
    assert [a.version for a in d.actions if isinstance(a, agg.ModelCommitted)] == [1]
    before = len(d.actions)
    d.feed(agg.BrokerSessionLost(d.now))  # re-publishes model and round
    d.online("b")  # a newcomer while the retained model is a delta: re-sent in full
    again = d.actions[before:]
    assert any(isinstance(a, agg.PublishModel) for a in again)
    assert not any(isinstance(a, agg.ModelCommitted) for a in again)


@pytest.mark.parametrize("saved_scaler,configured", [(True, "none"), (False, "federated")])
def test_a_lineage_keeps_the_scaling_it_was_trained_with(saved_scaler: bool, configured: str) -> None:
    spec = msgspec.structs.replace(SPEC, feature_mean=(0.0, 0.0), feature_std=(1.0, 1.0)) if saved_scaler else SPEC
    d = Driver(agg.RoundConfig(rounds=0, scaling="none" if saved_scaler else "none"), spec)
    d.start()
    d.online("a")
    d.update("a")  # version 1: trained with the saved lineage's scaling
    saved = d.machine.checkpoint()
    fresh = agg.RoundStateMachine(agg.RoundConfig(scaling=configured), SPEC, zeros(), random.Random(0))
    with pytest.raises(agg.IncompatibleState) as err:
        fresh.restore(saved)
    assert err.value.key == "scaling" and err.value.value == configured


def test_a_gateway_claiming_huge_counts_weighs_at_most_its_share() -> None:
    d = Driver(agg.RoundConfig(rounds=5, min_participants=3, max_sample_share=0.5))
    d.start()
    for device in ("gw1", "gw2", "liar"):
        d.online(device)
    d.update("gw1", value=1.0, samples=100)
    d.update("gw2", value=1.0, samples=100)
    closed = d.update("liar", value=-50.0, samples=10**9)
    _, weights = d.fuse.calls[-1]
    assert sorted(weights) == [100.0, 100.0, 200.0]  # half of the round, not all of it
    summary = d.of(agg.PublishMetrics, closed)[0].summary
    assert summary.num_samples == 10**9 + 200  # what was claimed, shown as claimed
    assert summary.per_gateway["liar"]["rows"] == 10**9
    assert any("liar's 1000000000 rows weighed as 200" in a for a in summary.alerts)
    # without the cap the same claim takes the whole round
    d = Driver(agg.RoundConfig(rounds=5, min_participants=2))
    d.start()
    d.online("gw1")
    d.online("liar")
    d.update("gw1", samples=100)
    d.update("liar", samples=10**9)
    assert d.fuse.calls[-1][1] == [100.0, 1e9]


# ---- who is online survives a restart -------------------------------------------------------------


def test_a_resumed_round_waits_for_every_gateway_that_was_online() -> None:
    config = agg.RoundConfig(rounds=5, min_participants=2, round_timeout_s=600)
    d = Driver(config)
    d.start()
    for device in ("gw1", "gw2", "gw3"):
        d.online(device)
    d.run_round(("gw1", "gw2", "gw3"))  # round 2's announcement checkpoints who is online
    d.update("gw1")  # round 2 is under way when the aggregator stops
    again = Driver(config, now=T0 + 60)
    again.machine.restore(d.last_checkpoint())
    assert again.machine.online == {"gw1", "gw2", "gw3"}
    again.start()
    # the retained statuses and the resent updates arrive in any order after a restart:
    # two updates before gw3's status must not close the round without gw3
    again.update("gw1")
    assert again.of(agg.PublishMetrics, again.update("gw2")) == []
    again.online("gw3")
    assert again.of(agg.PublishMetrics, again.update("gw3"))[0].summary.participants == ("gw1", "gw2", "gw3")


def test_a_restored_gateway_that_says_nothing_after_the_restart_is_not_waited_for() -> None:
    config = agg.RoundConfig(rounds=5, min_participants=2, round_timeout_s=600)
    d = Driver(config)
    d.start()
    for device in ("gw1", "gw2", "gw3"):
        d.online(device)
    d.run_round(("gw1", "gw2", "gw3"))
    again = Driver(config, now=T0 + 60)
    again.machine.restore(d.last_checkpoint())
    again.start()
    again.online("gw1")
    again.online("gw2")
    again.update("gw1")
    again.update("gw2")
    assert [a for a in again.of(agg.PublishMetrics) if not a.again] == []  # gw3 may still come
    closed = again.tick(T0 + 60 + agg.CONFIRM_S)  # no status from gw3 since the restart
    assert again.of(agg.PublishMetrics, closed)[0].summary.participants == ("gw1", "gw2")
    assert "gw3" not in again.machine.online


# ---- a silent gateway ------------------------------------------------------------------------------


def test_a_silent_gateway_costs_the_straggler_window_not_the_deadline() -> None:
    """gw3 is online (the broker has not noticed its link is gone) and sends nothing."""
    d = Driver(agg.RoundConfig(rounds=5, min_participants=1, round_timeout_s=600))
    d.start()
    for name in ("gw1", "gw2", "gw3"):
        d.online(name)
    d.now = T0 + 3.0  # training took 3 s
    assert not d.of(agg.PublishMetrics, d.run_round(("gw1", "gw2")))
    # half answered at +3 s: the rest get max(5 s, 2 x 3 s) more
    assert not d.of(agg.PublishMetrics, d.tick(T0 + 8.9))
    [published] = d.of(agg.PublishMetrics, d.tick(T0 + 9.0))
    assert published.summary.participants == ("gw1", "gw2")
    [alert] = [a for a in published.summary.alerts if "straggler window" in a]
    assert alert.startswith("closed without gw3: no update 6.0 s")
    # a straggler that answers within the window still counts
    d.tick(T0 + 10.0)
    d.run_round(("gw1", "gw2"))
    d.now = T0 + 12.0
    [published] = d.of(agg.PublishMetrics, d.update("gw3"))
    assert published.summary.participants == ("gw1", "gw2", "gw3")


def test_less_than_half_answered_waits_for_the_deadline_and_zero_turns_the_window_off() -> None:
    for factor, answering in ((2.0, ("gw1",)), (0.0, ("gw1", "gw2"))):
        d = Driver(agg.RoundConfig(rounds=5, min_participants=1, round_timeout_s=600,
                                   straggler_factor=factor))
        d.start()
        for name in ("gw1", "gw2", "gw3"):
            d.online(name)
        d.run_round(answering)
        assert not d.of(agg.PublishMetrics, d.tick(T0 + 599.0))
        [published] = d.of(agg.PublishMetrics, d.tick(T0 + 600.0))
        assert published.summary.participants == answering


def test_a_broker_restart_mid_round_loses_no_update() -> None:
    """A stopping Mosquitto publishes every last will; the gateways return with their updates."""
    d = Driver(agg.RoundConfig(rounds=5, min_participants=1, round_timeout_s=600))
    d.start()
    for name in ("gw1", "gw2", "gw3"):
        d.online(name)
    for name in ("gw1", "gw2", "gw3"):
        d.feed(agg.DeviceOffline(d.now, name))
    d.now = T0 + 2.0
    for name in ("gw1", "gw2"):  # back first, with their resent updates
        d.online(name)
        assert not d.of(agg.PublishMetrics, d.update(name))
    d.now = T0 + 4.0
    d.online("gw3")
    [published] = d.of(agg.PublishMetrics, d.update("gw3"))
    assert published.summary.participants == ("gw1", "gw2", "gw3")
    assert not d.of(agg.UpdateRejected)


def test_a_gateway_that_left_and_stays_away_costs_the_straggler_window() -> None:
    d = Driver(agg.RoundConfig(rounds=5, min_participants=1, round_timeout_s=600))
    d.start()
    for name in ("gw1", "gw2"):
        d.online(name)
    d.feed(agg.DeviceOffline(d.now, "gw2"))  # killed: its socket closed, the will went out
    assert not d.of(agg.PublishMetrics, d.update("gw1"))
    assert not d.of(agg.PublishMetrics, d.tick(T0 + 4.9))
    [published] = d.of(agg.PublishMetrics, d.tick(T0 + 5.0))
    assert published.summary.participants == ("gw1",)
    assert any(a.startswith("closed without gw2") for a in published.summary.alerts)
    # the next round does not wait for it at all: it was offline when the round began
    assert d.of(agg.PublishMetrics, d.update("gw1"))
