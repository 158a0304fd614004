"""Pure tests of aggregator.deployment: deployments, canary promotion and roll-back."""

from __future__ import annotations

import json
import random

import pytest

from aggregator.deployment import (
    HISTORY_KEPT,
    DeployAction,
    DeployConfig,
    DeploymentDecided,
    DeploymentManager,
    PublishDeployment,
)
from fedcore.protocol.messages import CanaryReport

T0 = 1_000.0
READY = [f"gw{i:02d}" for i in range(8)]


def manager(policy: str = "canary", metric: str = "rmse", higher_is_better: bool = False,
            **config: float) -> DeploymentManager:
    m = DeploymentManager(DeployConfig(policy=policy, **config), metric, higher_is_better)  # type: ignore[arg-type]
    # under a canary policy nothing runs before a canary has judged it: the start pins v0
    first = "version" if policy == "canary" else "latest"
    assert m.on_start(0, T0) == [PublishDeployment(0, first, 0, reason="lineage started")]
    return m


def canary_started(m: DeploymentManager, version: int = 1, ready: list[str] = READY,
                   now: float = T0 + 10) -> PublishDeployment:
    (record,) = m.on_commit(version, ready, now, random.Random(4))
    assert isinstance(record, PublishDeployment) and record.mode == "canary"
    return record


def report(m: DeploymentManager, candidate_value: float, incumbent_value: float, rows: int = 100,
           metric: str = "rmse", **changes: int) -> CanaryReport:
    """A canary's report for the trial in progress; ``changes`` override its header."""
    assert m.canary is not None
    fields = {"sequence": m.sequence, "candidate": m.canary.candidate, "incumbent": m.version}
    fields.update(changes)
    return CanaryReport(fields["sequence"], fields["candidate"], fields["incumbent"],
                        {metric: candidate_value}, {metric: incumbent_value}, rows)


def decided(actions: list[DeployAction] | str) -> tuple[DeploymentDecided, PublishDeployment]:
    assert isinstance(actions, list), actions
    decision, record = actions
    assert isinstance(decision, DeploymentDecided) and isinstance(record, PublishDeployment)
    return decision, record


# ---- policy latest ------------------------------------------------------------------------------


def test_policy_latest_deploys_each_commit_without_a_record() -> None:
    m = manager(policy="latest")
    for version in range(1, 6):
        assert m.on_commit(version, READY, T0 + version, random.Random(0)) == []
    assert (m.mode, m.version, m.sequence, len(m.history)) == ("latest", 5, 0, 1)
    assert m.canary is None


def test_a_restored_manager_announces_nothing_on_start() -> None:
    m = manager(policy="latest")
    again = DeploymentManager(m.config, m.metric, m.higher_is_better)
    again.restore(m.to_dict())
    assert again.on_start(7, T0 + 50) == []
    assert again.sequence == 0


# ---- canary: who, when -----------------------------------------------------------------------------


def test_canaries_are_a_fraction_of_the_ready_gateways() -> None:
    m = manager(canary_fraction=0.25)
    record = canary_started(m)
    assert record.sequence == 1 and record.version == 0 and record.candidate == 1
    assert len(record.canary) == 2 and set(record.canary) <= set(READY)
    assert record.canary == tuple(sorted(record.canary))
    assert m.canary is not None and m.canary.devices == record.canary


def test_at_least_one_canary_and_none_without_ready_gateways() -> None:
    m = manager(canary_fraction=0.01)
    assert m.on_commit(1, [], T0, random.Random(0)) == []  # nobody to try it on
    assert m.canary is None
    assert canary_started(m, version=2, ready=["only"]).canary == ("only",)


def test_a_candidate_every_n_versions() -> None:
    m = manager(every=3)
    assert m.on_commit(1, READY, T0, random.Random(0)) == []
    assert m.on_commit(2, READY, T0, random.Random(0)) == []
    assert canary_started(m, version=3).candidate == 3


def test_no_second_candidate_while_one_is_on_trial() -> None:
    m = manager()
    canary_started(m, version=1)
    assert m.on_commit(2, READY, T0 + 20, random.Random(0)) == []
    assert m.canary is not None and m.canary.candidate == 1


# ---- canary: decisions ------------------------------------------------------------------------------


@pytest.mark.parametrize(("metric", "higher_is_better", "incumbent", "candidate", "promoted"), [
    ("rmse", False, 1.00, 0.90, True),  # better
    ("rmse", False, 1.00, 1.019, True),  # worse, within 2 %
    ("rmse", False, 1.00, 1.03, False),  # worse by 3 %
    ("accuracy", True, 0.90, 0.95, True),
    ("accuracy", True, 0.90, 0.8838, True),  # 1.8 % lower
    ("accuracy", True, 0.90, 0.87, False),  # 3.3 % lower
])
def test_promotion_within_max_regression(metric: str, higher_is_better: bool, incumbent: float,
                                         candidate: float, promoted: bool) -> None:
    m = manager(metric=metric, higher_is_better=higher_is_better, max_regression=0.02,
                canary_fraction=0.25)
    start = canary_started(m)
    first, second = start.canary
    assert m.on_report(first, report(m, candidate, incumbent, metric=metric), T0 + 20) == []
    decision, record = decided(m.on_report(second, report(m, candidate, incumbent, metric=metric),
                                           T0 + 30))
    assert (decision.candidate, decision.incumbent, decision.promoted) == (1, 0, promoted)
    assert decision.figures["candidate_metric"] == pytest.approx(candidate)
    assert decision.figures["incumbent_metric"] == pytest.approx(incumbent)
    assert decision.figures["reports"] == 2.0
    assert record.mode == "version" and record.sequence == 2
    assert record.version == (1 if promoted else 0)
    assert ("promoted" if promoted else "rolled back") in record.reason
    assert m.version == record.version and m.canary is None and not m.pinned


def test_each_canary_counts_alike_and_the_median_decides() -> None:
    m = manager(canary_fraction=0.25, max_regression=0.02)
    first, second = canary_started(m).canary
    # a canary claiming a huge gain on a huge holdout cannot outvote one that sees a loss
    m.on_report(first, report(m, 0.01, 1.0, rows=10**12), T0 + 20)
    decision, record = decided(m.on_report(second, report(m, 2.0, 1.0, rows=10), T0 + 21))
    assert decision.figures["median_worsening"] == pytest.approx(1.0)  # the upper of two
    assert decision.figures["rows"] == 10**9 + 10  # a claim is capped
    assert not decision.promoted and record.version == 0


def test_a_report_with_a_non_finite_or_negative_metric_is_refused() -> None:
    m = manager(canary_fraction=0.25)
    first, _ = canary_started(m).canary
    for bad in (float("inf"), float("nan"), -1.0):
        assert m.on_report(first, report(m, 1.0, bad), T0 + 20) == "bad_report"
    assert m.on_report(first, report(m, 1.0, 1.0, rows=0), T0 + 20) == "bad_report"


def test_no_report_by_the_timeout_rolls_back() -> None:
    m = manager(canary_timeout_s=300)
    canary_started(m, now=T0)
    assert m.on_tick(T0 + 299) == []
    decision, record = decided(m.on_tick(T0 + 300))
    assert not decision.promoted and "no canary reported within 300 s" in decision.detail
    assert (record.mode, record.version) == ("version", 0)
    assert "rolled back" in record.reason
    assert m.on_tick(T0 + 900) == []  # decided once


def test_partial_reports_are_decided_at_the_timeout() -> None:
    m = manager(canary_fraction=0.5, canary_timeout_s=300)
    devices = canary_started(m, now=T0).canary
    assert len(devices) == 4
    assert m.on_report(devices[0], report(m, 0.95, 1.0, rows=50), T0 + 100) == []
    assert m.on_tick(T0 + 250) == []
    decision, record = decided(m.on_tick(T0 + 300))
    assert decision.promoted and decision.figures["reports"] == 1.0
    assert record.version == 1


def test_a_bad_partial_report_at_the_timeout_rolls_back() -> None:
    m = manager(canary_fraction=0.5, canary_timeout_s=60)
    devices = canary_started(m, now=T0).canary
    m.on_report(devices[1], report(m, 1.5, 1.0), T0 + 10)
    decision, record = decided(m.on_tick(T0 + 60))
    assert not decision.promoted and record.version == 0


# ---- canary: refused reports ----------------------------------------------------------------------


def test_reports_are_refused_with_a_reason() -> None:
    m = manager(canary_fraction=0.25)
    start = canary_started(m)
    canary = start.canary[0]
    outsider = next(d for d in READY if d not in start.canary)
    assert m.on_report(outsider, report(m, 0.5, 1.0), T0 + 11) == "not_canary"
    assert m.on_report(canary, report(m, 0.5, 1.0, sequence=m.sequence - 1), T0 + 11) == "no_canary"
    assert m.on_report(canary, report(m, 0.5, 1.0, sequence=m.sequence + 1), T0 + 11) == "no_canary"
    assert m.on_report(canary, report(m, 0.5, 1.0, candidate=2), T0 + 11) == "wrong_versions"
    assert m.on_report(canary, report(m, 0.5, 1.0, incumbent=1), T0 + 11) == "wrong_versions"
    assert m.on_report(canary, report(m, 0.5, 1.0, metric="mae"), T0 + 11) == "bad_report"
    # none of them counted: the timeout finds no report
    decision, _ = decided(m.on_tick(T0 + 10 + m.config.canary_timeout_s))
    assert not decision.promoted and decision.figures == {}


def test_a_report_without_a_canary_in_progress_is_refused() -> None:
    m = manager()
    assert m.on_report("gw00", CanaryReport(0, 1, 0, {"rmse": 1.0}, {"rmse": 1.0}), T0) == "no_canary"


# ---- operator --------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["latest", "canary"])
def test_an_operator_deploy_pins_until_follow_latest(policy: str) -> None:
    m = manager(policy=policy)
    for version in (1, 2, 3):
        m.on_commit(version, READY, T0 + version, random.Random(0))
    if policy == "canary":
        m.on_tick(T0 + 10_000)  # the trial of candidate 1 ends (rolled back)
    (record,) = m.deploy(2, T0 + 100, "operator: deploy 2")
    assert isinstance(record, PublishDeployment)
    assert (record.mode, record.version, record.reason) == ("version", 2, "operator: deploy 2")
    assert m.pinned
    for version in (4, 5, 6):
        assert m.on_commit(version, READY, T0 + 100 + version, random.Random(0)) == []
    assert (m.mode, m.version, m.canary) == ("version", 2, None)
    (record,) = m.follow_latest(6, T0 + 200)
    assert isinstance(record, PublishDeployment)
    assert (record.mode, record.version) == ("latest", 6) and not m.pinned
    after = m.on_commit(7, READY, T0 + 300, random.Random(0))
    if policy == "latest":
        assert after == [] and m.version == 7
    else:
        assert len(after) == 1 and after[0].mode == "canary" and after[0].candidate == 7


def test_an_operator_deploy_ends_a_trial() -> None:
    m = manager()
    start = canary_started(m)
    stale = report(m, 0.5, 1.0)
    m.deploy(0, T0 + 20, "operator: deploy 0")
    assert m.canary is None
    assert m.on_report(start.canary[0], stale, T0 + 21) == "no_canary"
    assert m.on_tick(T0 + 10_000) == []


def test_rollback_target_in_latest_mode_is_the_version_before_the_newest() -> None:
    m = manager(policy="latest")
    assert m.rollback_target(0) is None  # nothing before the first model
    for version in range(1, 11):
        m.on_commit(version, READY, T0 + version, random.Random(0))
    assert m.rollback_target(10) == 9


def test_rollback_target_in_version_mode_is_the_version_deployed_before() -> None:
    m = manager(policy="canary", canary_fraction=0.25)
    for candidate in (1, 2):  # both promoted
        devices = canary_started(m, version=candidate).canary
        for device in devices:
            m.on_report(device, report(m, 0.5, 1.0), T0 + 20)
    assert (m.mode, m.version) == ("version", 2)
    assert m.rollback_target(latest=2) == 1
    devices = canary_started(m, version=3).canary  # rolled back: the fleet stays on 2
    for device in devices:
        m.on_report(device, report(m, 2.0, 1.0), T0 + 30)
    assert m.version == 2 and m.rollback_target(latest=3) == 1


def test_two_rollbacks_step_back_one_version_each() -> None:
    m = manager(policy="latest")
    for version in range(1, 11):
        m.on_commit(version, READY, T0 + version, random.Random(0))
    first = m.rollback_target(10)
    assert first == 9
    m.deploy(first, T0 + 100, f"operator: rollback to {first}")
    # the fleet ran every version up to 10 in latest mode: before 9 it ran 8, not the
    # lineage's first model
    assert m.rollback_target(10) == 8


# ---- checkpoint ------------------------------------------------------------------------------------


def test_to_dict_and_restore_round_trip_with_a_trial_in_progress() -> None:
    m = manager(canary_fraction=0.25)
    start = canary_started(m)
    data = json.loads(json.dumps(m.to_dict()))  # it goes into the JSON checkpoint
    again = DeploymentManager(m.config, m.metric, m.higher_is_better)
    again.restore(data)
    assert again.to_dict() == m.to_dict()
    assert (again.sequence, again.mode, again.version, again.pinned) == (1, "canary", 0, False)
    # the restored trial goes on: the canaries' reports decide it
    for device in start.canary:
        outcome = again.on_report(device, report(again, 0.9, 1.0), T0 + 40)
    decision, record = decided(outcome)
    assert decision.promoted and record.sequence == 2 and record.version == 1


def test_restore_keeps_a_pin() -> None:
    m = manager()
    m.deploy(0, T0 + 5, "operator: deploy 0")
    again = DeploymentManager(m.config, m.metric, m.higher_is_better)
    again.restore(json.loads(json.dumps(m.to_dict())))
    assert again.pinned and again.on_commit(1, READY, T0 + 6, random.Random(0)) == []


def test_history_is_bounded() -> None:
    m = manager(policy="latest")
    for i in range(HISTORY_KEPT * 3):
        m.deploy(i % 5, T0 + i, "operator")
    assert len(m.history) == HISTORY_KEPT
    assert m.history[-1]["sequence"] == m.sequence == HISTORY_KEPT * 3
    long = {**m.to_dict(), "history": [{"version": 1}] * (HISTORY_KEPT + 10)}
    again = DeploymentManager(m.config, m.metric, m.higher_is_better)
    again.restore(long)
    assert len(again.history) == HISTORY_KEPT


def test_canaries_without_holdout_rows_abstain_and_the_candidate_waits_for_evidence() -> None:
    m = manager(canary_fraction=0.25)
    first, second = canary_started(m).canary
    empty = CanaryReport(m.sequence, 1, m.version)  # no holdout rows on that gateway
    assert m.on_report(first, empty, T0 + 20) == []
    decision, record = decided(m.on_report(second, empty, T0 + 21))  # decided at once, no timeout
    assert not decision.promoted and "no canary has holdout rows to judge it" in decision.detail
    assert (record.mode, record.version) == ("version", 0)
