"""Pure tests of buffered (FedBuff-style) rounds: one round machine, events fed by hand.

Each test names the rule of ``aggregator.buffered`` it checks: admission within
max_staleness, the staleness weight, the flush at K (or when nobody else can add), and
duplicates refused across buffers.
"""

from __future__ import annotations

import math
import random
from typing import Any

import numpy as np
import pytest

from aggregator import buffered as buf
from aggregator import rounds as agg
from edge.participant import encode_raw
from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec, ModelUpdate, PipelineConfig

T0 = 1_750_000_000.0
SPEC = ModelSpec("mlp", (2, 1))


def zeros() -> Params:
    return [np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)]


class Driver:
    def __init__(self, k: int = 2, max_staleness: int = 3, exponent: float = 0.5,
                 min_participants: int = 1, gateways: int = 5) -> None:
        config = agg.RoundConfig(
            rounds=0, min_participants=min_participants, round_timeout_s=30.0, mode="buffered",
            buffered=buf.BufferedConfig(k, max_staleness, exponent))
        self.machine = agg.RoundStateMachine(config, SPEC, zeros(), random.Random(0))
        self.now = T0
        self.actions: list[Any] = self.machine.handle(agg.Started(self.now))
        for i in range(1, gateways + 1):
            self.actions += self.machine.handle(agg.DeviceOnline(self.now, f"gw{i}"))
        self.ids = 0

    def update(self, device: str, value: float, base: int | None = None, samples: int = 100,
               message_id: str | None = None, round_: int | None = None) -> list[Any]:
        m = self.machine
        delta, _ = encode_raw([np.full((2, 1), value, np.float32), np.full((1,), value, np.float32)],
                              PipelineConfig())
        update = ModelUpdate(round=m.round if round_ is None else round_,
                             base_version=m.version if base is None else base,
                             num_samples=samples, delta=delta)
        self.ids += 1
        actions = m.handle(agg.UpdateReceived(self.now, device, message_id or f"m{self.ids}", update, 100))
        self.actions += actions
        return actions

    def of(self, kind: type, actions: list[Any] | None = None) -> list[Any]:
        return [a for a in (self.actions if actions is None else actions) if isinstance(a, kind)]


def test_the_weight_is_fedbuffs_inverse_square_root_and_zero_exponent_counts_in_full() -> None:
    assert buf.staleness_weight(0, 0.5) == 1.0
    assert buf.staleness_weight(3, 0.5) == pytest.approx(0.5)
    assert buf.staleness_weight(7, 0.0) == 1.0


def test_the_announcement_says_buffered() -> None:
    d = Driver()
    anns = [a.announcement for a in d.of(agg.PublishRound)]
    assert anns and all(a.mode == "buffered" for a in anns)


def test_the_buffer_flushes_at_k_updates_into_a_new_version() -> None:
    d = Driver(k=3)
    assert not d.of(agg.ModelCommitted, d.update("gw1", 1.0) + d.update("gw2", 1.0))
    assert d.machine.version == 0
    out = d.update("gw3", 1.0)
    assert [c.version for c in d.of(agg.ModelCommitted, out)] == [1]
    assert d.machine.version == 1 and d.machine.round == 2
    assert np.allclose(d.machine.weights[0], 1.0)
    # the next announcement is for buffer 2 on version 1, still buffered
    ann = d.of(agg.PublishRound, out)[-1].announcement
    assert (ann.round, ann.model_version, ann.mode) == (2, 1, "buffered")


def test_a_stale_update_counts_with_its_staleness_weight() -> None:
    d = Driver(k=2, exponent=0.5)
    d.update("gw1", 1.0)
    d.update("gw2", 1.0)  # flush: version 1, weights 1.0
    assert d.machine.version == 1
    # gw3 trained on version 0 (round 1) while away: staleness 1, weight 1/sqrt(2)
    accepted = d.of(agg.UpdateAccepted, d.update("gw3", 2.0, base=0, round_=1))
    assert [(a.device, a.round, a.staleness) for a in accepted] == [("gw3", 1, 1)]
    d.update("gw4", 0.0)  # fresh, weight 1
    assert d.machine.version == 2
    # sample-weighted mean of the discounted deltas, not renormalised: (2/sqrt(2) + 0) / 2
    assert np.allclose(d.machine.weights[0], 1.0 + 2.0 / math.sqrt(2) / 2, atol=1e-6)


def test_an_update_older_than_max_staleness_is_refused_and_counted() -> None:
    d = Driver(k=1, max_staleness=1)
    d.update("gw1", 1.0)
    d.update("gw2", 1.0)
    assert d.machine.version == 2
    out = d.update("gw3", 5.0, base=0, round_=1)  # staleness 2 > 1
    rejected = d.of(agg.UpdateRejected, out)
    assert [r.reason for r in rejected] == ["too_stale"]
    assert "staleness 2 > max_staleness 1" in rejected[0].detail
    assert d.machine.rejected["too_stale"] == 1
    assert d.machine.version == 2 and np.allclose(d.machine.weights[0], 2.0)
    # staleness 1 is still admitted
    assert d.of(agg.UpdateAccepted, d.update("gw3", 1.0, base=1, round_=2))


def test_a_base_or_round_from_the_future_is_refused() -> None:
    d = Driver(k=3)
    assert [r.reason for r in d.of(agg.UpdateRejected, d.update("gw1", 1.0, base=4))] == ["future_base"]
    assert [r.reason for r in d.of(agg.UpdateRejected, d.update("gw1", 1.0, round_=9))] == ["wrong_round"]
    assert d.machine.rejected == {"future_base": 1, "wrong_round": 1}


def test_duplicates_are_refused_within_a_buffer_and_after_later_flushes() -> None:
    d = Driver(k=2, max_staleness=3)
    d.update("gw1", 1.0, message_id="a")
    out = d.update("gw1", 1.0, message_id="a")  # QoS 1 redelivery
    assert [r.reason for r in d.of(agg.UpdateRejected, out)] == ["duplicate"]
    d.update("gw2", 1.0)
    for device in ("gw2", "gw3", "gw2", "gw3", "gw2", "gw3"):  # three more versions
        d.update(device, 0.0)
    assert d.machine.version == 4
    # redelivered four versions later: its id is still remembered (max_staleness + 2 buffers)
    out = d.update("gw1", 1.0, base=0, round_=1, message_id="a")
    assert [r.reason for r in d.of(agg.UpdateRejected, out)] == ["duplicate"]
    assert d.machine.rejected == {"duplicate": 2}


def test_a_second_update_of_one_gateway_waits_for_the_next_buffer_a_third_is_refused() -> None:
    d = Driver(k=2, max_staleness=3)
    d.update("gw1", 1.0)
    # back from away: the update it trained after coming back follows its queued one
    (deferred,) = d.of(agg.UpdateAccepted, d.update("gw1", 4.0))
    assert deferred.staleness == 1  # what it will have in the next buffer
    out = d.update("gw1", 9.0)
    assert [r.reason for r in d.of(agg.UpdateRejected, out)] == ["duplicate_device"]
    d.update("gw2", 1.0)  # buffer 1: gw1's first and gw2's
    assert d.machine.version == 1 and np.allclose(d.machine.weights[0], 1.0)
    assert set(d.machine.received) == {"gw1"}  # buffer 2 opens with gw1's second
    d.update("gw3", 0.0)
    assert d.machine.version == 2
    assert np.allclose(d.machine.weights[0], 1.0 + 4.0 / math.sqrt(2) / 2, atol=1e-6)
    assert d.machine.rejected == {"duplicate_device": 1}


def test_the_buffer_flushes_early_when_every_online_gateway_has_added_to_it() -> None:
    d = Driver(k=10, min_participants=2, gateways=3)
    d.update("gw1", 1.0)
    d.update("gw2", 1.0)
    assert d.machine.version == 0  # gw3 may still add
    d.actions += d.machine.handle(agg.DeviceOffline(d.now, "gw3"))
    assert d.machine.version == 0  # nobody else can add, but a version is at most every 5 s
    d.now += 4.9
    d.actions += d.machine.handle(agg.Tick(d.now))
    assert d.machine.version == 0
    d.now += 0.1
    d.actions += d.machine.handle(agg.Tick(d.now))
    assert d.machine.version == 1  # no point waiting for K


def test_a_lone_gateway_makes_at_most_one_version_per_min_interval() -> None:
    """Without the floor it trained on its own update's version at once, on the same rows."""
    d = Driver(k=10, min_participants=1, gateways=1)
    versions = []
    for _ in range(20):  # it answers each new version at once
        d.now += 1.0
        d.actions += d.machine.handle(agg.Tick(d.now))
        if d.machine.version not in versions:
            versions.append(d.machine.version)
            d.update("gw1", 1.0)
    assert versions == [0, 1, 2, 3, 4]  # a version at 5, 10, 15 and 20 s, not one a second


def test_a_buffer_below_quorum_at_the_deadline_is_extended_then_flushed() -> None:
    d = Driver(k=5, min_participants=2, gateways=4)
    d.update("gw1", 1.0)
    d.now += 31
    out = d.machine.handle(agg.Tick(d.now))
    assert [(q.received, q.needed) for q in d.of(agg.QuorumMissed, out)] == [(1, 2)]
    d.update("gw2", 1.0)
    assert d.machine.version == 0
    d.now += 31
    out = d.machine.handle(agg.Tick(d.now))
    assert [c.version for c in d.of(agg.ModelCommitted, out)] == [1]


def test_sync_mode_still_refuses_a_stale_base() -> None:
    config = agg.RoundConfig(rounds=0, min_participants=1)
    m = agg.RoundStateMachine(config, SPEC, zeros(), random.Random(0))
    m.handle(agg.Started(T0))
    m.handle(agg.DeviceOnline(T0, "gw1"))
    delta, _ = encode_raw(zeros(), PipelineConfig())
    out = m.handle(agg.UpdateReceived(T0, "gw1", "x", ModelUpdate(1, 3, 10, delta), 100))
    assert [a.reason for a in out if isinstance(a, agg.UpdateRejected)] == ["stale_base"]


def test_a_second_update_that_would_be_too_stale_in_the_next_buffer_is_refused_as_such() -> None:
    d = Driver(k=2, max_staleness=1)
    d.update("gw1", 1.0)
    d.update("gw2", 1.0)  # version 1
    d.update("gw1", 1.0)  # fresh, in the open buffer
    out = d.update("gw1", 1.0, base=0, round_=1)  # staleness 1 now, 2 in the next buffer
    assert [r.reason for r in d.of(agg.UpdateRejected, out)] == ["too_stale"]
    assert d.machine.deferred == {}
