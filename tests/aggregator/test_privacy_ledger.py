"""The aggregator's DP accountant, noise calibration and per-gateway privacy ledger."""

from __future__ import annotations

import json
import logging

import pytest

from aggregator.privacy import PrivacyLedger, epsilon_spent, noise_multiplier_for
from fedcore.errors import LocalProtocolError

DELTA = 1e-5


def test_accountant_matches_the_reference_value() -> None:
    # DEPENDENCY-NOTES: sigma=1, q=0.1, 100 steps, delta=1e-5 -> RDP epsilon 7.90
    assert epsilon_spent(1.0, 0.1, 100, DELTA) == pytest.approx(7.90, abs=0.01)


def test_epsilon_grows_with_steps_and_sampling_and_falls_with_noise() -> None:
    assert epsilon_spent(1.0, 1.0, 0, DELTA) == 0.0
    assert epsilon_spent(1.0, 1.0, 10, DELTA) < epsilon_spent(1.0, 1.0, 20, DELTA)
    assert epsilon_spent(1.0, 0.1, 20, DELTA) < epsilon_spent(1.0, 1.0, 20, DELTA)
    assert epsilon_spent(2.0, 1.0, 20, DELTA) < epsilon_spent(1.0, 1.0, 20, DELTA)
    assert epsilon_spent(0.0, 1.0, 1, DELTA) == float("inf")


def test_calibration_meets_the_target_tightly_and_is_monotone() -> None:
    previous = float("inf")
    for target in (0.5, 1.0, 2.0, 4.0, 8.0):
        z = noise_multiplier_for(target, DELTA, rounds=20, sampling_rate=1.0)
        spent = epsilon_spent(z, 1.0, 20, DELTA)
        assert spent <= target
        assert spent > target * 0.98  # not wastefully noisy
        assert z < previous  # a larger budget needs less noise
        previous = z
    few = noise_multiplier_for(2.0, DELTA, rounds=5, sampling_rate=1.0)
    many = noise_multiplier_for(2.0, DELTA, rounds=50, sampling_rate=1.0)
    assert few < many
    sampled = noise_multiplier_for(2.0, DELTA, rounds=50, sampling_rate=0.1)
    assert sampled < many
    with pytest.raises(ValueError):
        noise_multiplier_for(0.0, DELTA, rounds=5)


def test_importing_the_accountant_silences_absl_warnings() -> None:
    assert logging.getLogger("absl").getEffectiveLevel() >= logging.ERROR


def test_ledger_charges_each_gateway_for_its_own_updates() -> None:
    ledger = PrivacyLedger(target_epsilon=3.0, delta=DELTA)
    for _ in range(4):
        ledger.record("gw-a", 2.0)
    ledger.record("gw-b", 2.0)
    spent = ledger.spent()
    assert spent["gw-a"] == pytest.approx(epsilon_spent(2.0, 1.0, 4, DELTA))
    assert spent["gw-b"] == pytest.approx(epsilon_spent(2.0, 1.0, 1, DELTA))
    assert ledger.epsilon("gw-never") == 0.0 and ledger.releases("gw-a") == 4
    # mixed noise levels compose
    mixed = PrivacyLedger(10.0, DELTA)
    mixed.record("g", 2.0, steps=3)
    eps_after_mixed = mixed.record("g", 1.0)
    assert epsilon_spent(2.0, 1.0, 3, DELTA) < eps_after_mixed < epsilon_spent(1.0, 1.0, 4, DELTA)


def test_policy_stop_excludes_before_the_budget_is_exceeded() -> None:
    z = 2.0
    target = epsilon_spent(z, 1.0, 3, DELTA) + 1e-9  # room for exactly three updates
    ledger = PrivacyLedger(target, DELTA, policy="stop")
    for _ in range(3):
        decision = ledger.check("gw", z)
        assert decision.allowed and not decision.alert
        ledger.record("gw", z)
    decision = ledger.check("gw", z)
    assert not decision.allowed and "excluded" in decision.alert
    assert decision.epsilon_after > target >= decision.epsilon_now
    assert ledger.exhausted() == []


def test_policy_warn_lets_the_gateway_continue_with_an_alert() -> None:
    ledger = PrivacyLedger(0.5, DELTA, policy="warn")
    ledger.record("gw", 1.0, steps=5)
    decision = ledger.check("gw", 1.0)
    assert decision.allowed and "warn" in decision.alert
    assert ledger.exhausted() == ["gw"]


def test_ledger_survives_a_json_round_trip() -> None:
    ledger = PrivacyLedger(4.0, DELTA, policy="warn")
    ledger.record("gw-a", 1.5, steps=2)
    ledger.record("gw-a", 3.0)
    ledger.record("gw-b", 1.5, sampling_rate=0.5)
    restored = PrivacyLedger.from_dict(json.loads(json.dumps(ledger.to_dict())))
    assert restored.spent() == ledger.spent()
    assert restored.policy == "warn" and restored.target_epsilon == 4.0 and restored.delta == DELTA
    assert restored.releases("gw-a") == 3
    assert restored.to_dict() == ledger.to_dict()


@pytest.mark.parametrize(
    "damage",
    [{"version": 99}, {"policy": "maybe"}, {"devices": {"gw": [[1.0, 1.0, 0]]}},
     {"devices": {"gw": [[1.0, 1.0]]}}, {"target_epsilon": -1}],
)
def test_a_damaged_ledger_is_refused(damage: dict[str, object]) -> None:
    good = PrivacyLedger(4.0, DELTA).to_dict()
    with pytest.raises(LocalProtocolError):
        PrivacyLedger.from_dict({**good, **damage})
