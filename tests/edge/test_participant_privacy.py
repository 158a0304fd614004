"""Pure tests of a gateway's own [privacy] policy and ledger (edge.privacy, edge.participant)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from aggregator.privacy import PrivacyLedger, epsilon_spent
from edge import participant as edge
from edge import state as saved_state
from edge.privacy import GatewayLedger, PrivacyPolicy, charge
from fedcore.errors import ConfigError, LocalProtocolError
from fedcore.privacy.accountant import epsilon_of
from fedcore.protocol.messages import (
    GlobalModel,
    ModelSpec,
    PipelineConfig,
    RoundAnnouncement,
    TrainConfig,
)
from fedcore.protocol.tensors import encode_tensors

SPEC = ModelSpec(kind="mlp", layer_sizes=(1, 1))
DP_TRAIN = TrainConfig(local_epochs=1, batch_size=10, dp_clip=1.0, dp_noise=1.1)


def model(version: int) -> GlobalModel:
    w = [np.zeros((1, 1), np.float32), np.zeros((1,), np.float32)]
    return GlobalModel(version, version, b"", SPEC, encode_tensors(w))


def ann(round_: int, noise: float, clip: float = 1.0, train: TrainConfig | None = None) -> RoundAnnouncement:
    return RoundAnnouncement(round=round_, model_version=0, deadline=0.0,
                             pipeline=PipelineConfig(clip_norm=clip, noise_multiplier=noise),
                             train=train or TrainConfig())


def gateway(policy: PrivacyPolicy) -> edge.Participant:
    p = edge.Participant("gw1", ledger=GatewayLedger(policy))
    p.handle(edge.ModelReceived(0.0, model(0)))
    return p


def finish(p: edge.Participant, start: edge.Action, rows: int = 100) -> list[edge.Action]:
    assert isinstance(start, edge.StartTraining)
    weights = [w + 1.0 for w in start.weights]
    return p.handle(edge.TrainingFinished(0.0, start.round, start.base_version, weights, rows, 0.5,
                                          {}, start.lineage))


def test_a_round_with_noise_below_the_policy_is_refused_before_training() -> None:
    p = gateway(PrivacyPolicy(require="update", min_noise_multiplier=0.8))
    (out,) = p.handle(edge.RoundAnnounced(0.0, ann(1, noise=0.0)))
    assert isinstance(out, edge.SatOut) and out.reason.startswith("privacy_policy:")
    assert "pipeline.noise_multiplier=0" in out.reason
    (out,) = p.handle(edge.RoundAnnounced(0.0, ann(2, noise=0.5)))
    assert isinstance(out, edge.SatOut) and "min_noise_multiplier = 0.8" in out.reason
    assert p.ledger is not None and p.ledger.events == {}


def test_a_complying_round_is_trained_sent_and_charged_after_a_refused_one() -> None:
    p = gateway(PrivacyPolicy(require="update", min_noise_multiplier=0.8))
    p.handle(edge.RoundAnnounced(0.0, ann(1, noise=0.0)))
    met, start = p.handle(edge.RoundAnnounced(0.0, ann(2, noise=1.0)))
    assert met == edge.PolicyMet(2)
    (publish,) = finish(p, start)
    assert isinstance(publish, edge.PublishUpdate)
    assert p.ledger is not None and p.ledger.events == {(1.0, 1.0): 1}


def test_record_level_policy_refuses_a_round_without_dp_sgd() -> None:
    p = gateway(PrivacyPolicy(require="record"))
    (out,) = p.handle(edge.RoundAnnounced(0.0, ann(1, noise=5.0)))  # update-level noise only
    assert isinstance(out, edge.SatOut) and "train.dp_noise=0" in out.reason
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(2, noise=0.0, train=DP_TRAIN)))[1:]
    (publish,) = finish(p, start, rows=200)
    assert isinstance(publish, edge.PublishUpdate)
    assert p.ledger is not None and sum(p.ledger.events.values()) > 1  # one release per step


def test_the_gateway_stops_when_its_budget_would_be_exceeded() -> None:
    # z = 1, sampling rate 1: two updates cost 24.9 at delta 1e-5, three 27.7 (the accountant)
    budget = (epsilon_spent(1.0, 1.0, 2, 1e-5) + epsilon_spent(1.0, 1.0, 3, 1e-5)) / 2
    p = gateway(PrivacyPolicy(require="update", max_epsilon=budget))
    for round_ in (1, 2):
        actions = p.handle(edge.RoundAnnounced(0.0, ann(round_, noise=1.0)))
        assert isinstance(finish(p, actions[-1])[0], edge.PublishUpdate)
    (out,) = p.handle(edge.RoundAnnounced(0.0, ann(3, noise=1.0)))
    assert isinstance(out, edge.SatOut) and out.reason.startswith("privacy_budget_spent:")
    assert f"max_epsilon = {budget:g}" in out.reason
    assert p.ledger is not None and p.ledger.events == {(1.0, 1.0): 2}
    # more noise fits the rest of the budget: the gateway takes part again
    met, start = p.handle(edge.RoundAnnounced(0.0, ann(4, noise=50.0)))
    assert met == edge.PolicyMet(4) and isinstance(finish(p, start)[0], edge.PublishUpdate)


def test_a_record_level_budget_is_checked_with_the_real_rows_before_sending() -> None:
    policy = PrivacyPolicy(require="record", max_epsilon=0.5)
    p = gateway(policy)
    start = p.handle(edge.RoundAnnounced(0.0, ann(1, noise=0.0, train=DP_TRAIN)))[-1]
    (out,) = finish(p, start, rows=20)  # q = 0.5: one round is far over 0.5
    assert isinstance(out, edge.SatOut) and out.reason.startswith("privacy_budget_spent:")
    assert p.ledger is not None and p.ledger.events == {}


@pytest.mark.parametrize("z, q, steps", [(1.0, 1.0, 1), (0.7, 1.0, 12), (3.0, 1.0, 400)])
def test_update_level_ledger_matches_the_aggregators_accountant(z: float, q: float, steps: int) -> None:
    policy = PrivacyPolicy(require="update")
    ledger = GatewayLedger(policy)
    agg = PrivacyLedger(1e9, policy.delta)
    for _ in range(steps):
        ledger.record(charge(policy, ann(1, noise=z), 100))
        agg.record("gw1", z, q)
    assert math.isclose(ledger.epsilon(), agg.epsilon("gw1"), rel_tol=1e-9)


def test_record_level_ledger_is_never_below_the_aggregators() -> None:
    policy = PrivacyPolicy(require="record")
    z, q, steps = charge(policy, ann(1, noise=0.0, train=DP_TRAIN), 500)
    ours, theirs = epsilon_of([(z, q, steps * 30)], 1e-5), epsilon_spent(z, q, steps * 30, 1e-5)
    assert theirs <= ours <= theirs * 1.01  # integer RDP orders only: a little conservative


def test_a_saved_ledger_round_trips_and_a_damaged_one_is_refused() -> None:
    policy = PrivacyPolicy(require="update", max_epsilon=10.0)
    ledger = GatewayLedger(policy, {(1.0, 1.0): 3})
    assert GatewayLedger.from_dict(policy, ledger.to_dict()).events == {(1.0, 1.0): 3}
    with pytest.raises(LocalProtocolError, match="damaged"):
        GatewayLedger.from_dict(policy, {"version": 1, "events": [[1.0, 1.0, 0]]})


def test_the_ledger_file_in_state_dir_survives_a_restart_and_damage_stops_the_start(tmp_path: Path) -> None:
    policy = PrivacyPolicy(require="update", max_epsilon=10.0)
    assert saved_state.load_ledger(tmp_path, policy).events == {}  # none yet: empty
    saved_state.save_ledger(tmp_path, GatewayLedger(policy, {(1.0, 1.0): 2}))
    assert saved_state.load_ledger(tmp_path, policy).events == {(1.0, 1.0): 2}
    for damage in ("{not json", '{"version": 1, "events": [[1.0, 1.0, 0]]}'):
        (tmp_path / "privacy-ledger.json").write_text(damage)
        with pytest.raises(ConfigError, match="damaged") as err:  # exit 78: an operator must act
            saved_state.load_ledger(tmp_path, policy)  # never taken as a fresh budget
        assert err.value.exit_code == 78
