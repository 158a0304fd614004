"""Reputation: normalisation, quarantine after K outlier rounds in a window, release, JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest

from aggregator import robust
from aggregator.reputation import (
    Quarantined,
    Released,
    ReputationConfig,
    ReputationState,
    normalised_distances,
    observe,
    release,
)

CONFIG = ReputationConfig(outlier_ratio=3.0, window=4, quarantine_after=3, smoothing=0.5)
HONEST = {"a": 1.0, "b": 2.0, "c": 2.0, "d": 3.0}


def test_distances_are_normalised_by_the_round_median() -> None:
    # median of 1, 2, 2, 3, 20 is 2
    got = normalised_distances({**HONEST, "evil": 20.0})
    assert got == {"a": 0.5, "b": 1.0, "c": 1.0, "d": 1.5, "evil": 10.0}


def test_normalised_distance_is_capped_and_survives_a_zero_median() -> None:
    assert normalised_distances({"a": 1.0, "b": 1.0, "c": 1e9}, max_ratio=50.0)["c"] == 50.0
    assert normalised_distances({"a": 0.0, "b": 0.0, "c": 2.0}, max_ratio=50.0) == {
        "a": 0.0, "b": 0.0, "c": 50.0}


def run(rounds: list[dict[str, float]], state: ReputationState | None = None) -> tuple[
        ReputationState, list[object]]:
    state = state or ReputationState()
    events: list[object] = []
    for r, distances in enumerate(rounds, start=1):
        state, new = observe(state, CONFIG, r, distances)
        events += new
    return state, events


def test_a_persistent_outlier_is_quarantined_on_its_third_outlier_round() -> None:
    state, events = run([{**HONEST, "evil": 20.0}] * 5)
    assert len(events) == 1
    event = events[0]
    assert isinstance(event, Quarantined)
    assert (event.device, event.round, event.outlier_rounds) == ("evil", 3, 3)
    # score: 10, then 0.5*10 + 0.5*10 ... stays 10
    assert event.score == pytest.approx(10.0)
    assert state.quarantined == {"evil"}
    assert state.devices["evil"].quarantined_since == 3


def test_an_occasional_outlier_is_not_quarantined() -> None:
    bad, good = {**HONEST, "flaky": 20.0}, {**HONEST, "flaky": 2.0}
    # 2 outliers in every window of 4: never 3
    state, events = run([bad, good, good, bad, good, good, bad, good])
    assert events == []
    assert state.quarantined == frozenset()


def test_the_window_counts_the_gateways_own_rounds() -> None:
    # "evil" is absent from the middle rounds: its 3 outlier rounds still count together
    absent = dict(HONEST)
    state, events = run([{**HONEST, "evil": 20.0}, absent, absent, absent,
                         {**HONEST, "evil": 20.0}, {**HONEST, "evil": 20.0}])
    assert [(e.device, e.round) for e in events if isinstance(e, Quarantined)] == [("evil", 6)]


def test_small_rounds_are_not_judged() -> None:
    state, events = run([{"a": 1.0, "evil": 50.0}] * 10)
    assert events == [] and state.devices == {}


def test_release_clears_the_window_and_needs_fresh_evidence() -> None:
    state, _ = run([{**HONEST, "evil": 20.0}] * 3)
    state, events = release(state, "evil", 4)
    assert events == [Released("evil", 4)]
    assert state.quarantined == frozenset()
    state, events = observe(state, CONFIG, 5, {**HONEST, "evil": 20.0})
    assert events == []  # one outlier round after release is not enough
    state, _ = observe(state, CONFIG, 6, {**HONEST, "evil": 20.0})
    state, events = observe(state, CONFIG, 7, {**HONEST, "evil": 20.0})
    assert [type(e) for e in events] == [Quarantined]


def test_release_of_a_device_not_quarantined_does_nothing() -> None:
    state, _ = run([HONEST])
    assert release(state, "a", 2) == (state, [])
    assert release(state, "nobody", 2) == (state, [])


def test_quarantined_device_raises_no_repeat_events() -> None:
    _, events = run([{**HONEST, "evil": 20.0}] * 10)
    assert len(events) == 1


def test_state_round_trips_through_json() -> None:
    state, _ = run([{**HONEST, "evil": 20.0}] * 3 + [{**HONEST, "evil": 1.0}])
    text = json.dumps(state.to_dict())
    again = ReputationState.from_dict(json.loads(text))
    assert again.to_dict() == state.to_dict()
    assert again.quarantined == {"evil"}
    # and it carries on identically
    a = observe(state, CONFIG, 5, {**HONEST, "evil": 20.0})
    b = observe(again, CONFIG, 5, {**HONEST, "evil": 20.0})
    assert a[0].to_dict() == b[0].to_dict()


@pytest.mark.parametrize("bad", [
    {"version": 2, "devices": {}},
    {"version": 1, "devices": []},
    {"version": 1, "devices": {"x": {"score": 1.0}}},
    {"version": 1, "devices": {"x": {"score": "high", "recent": [], "rounds_judged": 0,
                                     "quarantined_since": None}}},
])
def test_corrupt_state_is_refused_with_a_reason(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="reputation state"):
        ReputationState.from_dict(bad)


@pytest.mark.parametrize(("field", "value"), [
    ("outlier_ratio", 1.0), ("window", 0), ("quarantine_after", 6), ("smoothing", 0.0),
    ("min_updates", 1), ("max_ratio", 2.0)])
def test_config_check_names_the_field(field: str, value: float) -> None:
    config = ReputationConfig(**{"window": 5, field: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=field):
        config.check()
    ReputationConfig().check()


def test_scaling_attackers_are_quarantined_from_real_fusion_distances() -> None:
    """End to end with a robust rule: 2 of 10 gateways send 10x updates every round."""
    rng = np.random.default_rng(3)
    state = ReputationState()
    config = ReputationConfig()
    quarantined_at: dict[str, int] = {}
    for round_ in range(1, 8):
        honest = rng.standard_normal(50)
        updates = {f"g{i}": honest + 0.3 * rng.standard_normal(50) for i in range(8)}
        updates |= {f"evil{i}": 10 * (honest + 0.3 * rng.standard_normal(50)) for i in range(2)}
        names = sorted(updates)
        params = [[updates[n].astype(np.float32)] for n in names]
        result = robust.fuse("median", params, [1.0] * len(names))
        distances = dict(zip(names, result.per_client_info["distance"], strict=True))
        state, events = observe(state, config, round_, distances)
        for e in events:
            assert isinstance(e, Quarantined)
            quarantined_at[e.device] = e.round
    assert quarantined_at == {"evil0": 3, "evil1": 3}
