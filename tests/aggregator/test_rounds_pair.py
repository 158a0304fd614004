"""Pair tests: the aggregator's round machine wired to participants in memory."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator import rounds as agg
from aggregator.fusion import make_fuse
from aggregator.reputation import ReputationConfig
from edge import participant as edge
from tests.pair import Federation, Gateway


def make(n_rounds: int = 3, **kw) -> Federation:
    gws = [Gateway("gw1", 1.0, 100), Gateway("gw2", 3.0, 300)]
    return Federation(gws, agg.RoundConfig(rounds=n_rounds, min_participants=2, **kw))


def test_rounds_complete_and_fedavg_is_sample_weighted() -> None:
    fed = make(n_rounds=20)
    fed.start()
    for _ in range(40):
        fed.flush()
    finished = fed.of(agg.RunFinished)
    assert finished and finished[0].round == 20 and finished[0].model_version == 20
    # weighted mean of the targets: (1*100 + 3*300) / 400 = 2.5
    assert np.allclose(fed.server.weights[0], 2.5, atol=1e-3)
    summaries = [a.summary for a in fed.of(agg.PublishMetrics)]
    assert [s.round for s in summaries] == list(range(1, 21))
    assert all(s.participants == ("gw1", "gw2") for s in summaries)
    assert summaries[0].metrics["eval_loss"] == pytest.approx(2.5)


def test_duplicates_and_late_updates_are_dropped_with_reasons() -> None:
    fed = make()
    fed.start()
    queued = list(fed.outbox)
    fed.flush()  # round 1 closes
    for name, action in queued:  # QoS 1 redelivery of round-1 updates
        fed.feed(agg.UpdateReceived(fed.now, name, action.message_id, action.update))
    rejected = fed.of(agg.UpdateRejected)
    assert {r.reason for r in rejected} == {"duplicate"}
    assert fed.server.rejected["duplicate"] == 2
    # a fresh id for an old round is late
    name, action = queued[0]
    fed.feed(agg.UpdateReceived(fed.now, name, "fresh-id", action.update))
    assert fed.of(agg.UpdateRejected)[-1].reason == "late"


def test_quorum_missed_extends_the_deadline_then_closes() -> None:
    fed = make(round_timeout_s=10)
    fed.start()
    fed.flush(drop={"gw2"})
    assert fed.server.round == 1
    fed.now += 11
    fed.feed(agg.Tick(fed.now))
    missed = fed.of(agg.QuorumMissed)
    assert missed and missed[0].received == 1 and missed[0].needed == 2
    # the re-announcement makes gw2 resend its cached update with the same message id
    assert fed.server.round == 1
    fed.deliver(fed.gateways["gw2"], edge.RoundAnnounced(fed.now, fed.retained_round))
    fed.flush()
    assert fed.server.round == 2


def test_deadline_closes_with_quorum_even_if_a_gateway_is_silent() -> None:
    gws = [Gateway("gw1", 1.0, 100), Gateway("gw2", 3.0, 300), Gateway("gw3", 5.0, 100)]
    fed = Federation(gws, agg.RoundConfig(rounds=2, min_participants=2, round_timeout_s=5))
    fed.start()
    fed.flush(drop={"gw3"})
    assert fed.server.round == 1  # still waiting for gw3, which is online
    fed.now += 6
    fed.feed(agg.Tick(fed.now))
    assert fed.server.round == 2
    assert fed.of(agg.PublishMetrics)[0].summary.participants == ("gw1", "gw2")


def test_gateway_offline_for_a_round_catches_up_from_retained_messages() -> None:
    fed = make(n_rounds=4)
    gws = fed.gateways
    fed.start()
    fed.flush()
    gws["gw2"].online = False
    fed.feed(agg.DeviceOffline(fed.now, "gw2"))
    fed.server.config = agg.RoundConfig(rounds=4, min_participants=1)
    fed.feed(agg.Tick(fed.now))
    fed.flush(drop={"gw2"})  # round 2: gw2 left it, and is awaited for the straggler window
    assert fed.server.round == 2
    fed.now += 6
    fed.feed(agg.Tick(fed.now))  # round 2 with gw1 only
    [summary] = [a.summary for a in fed.of(agg.PublishMetrics) if a.summary.round == 2]
    assert summary.participants == ("gw1",)
    assert any("closed without gw2" in alert for alert in summary.alerts)
    fed.reconnect(gws["gw2"])
    assert gws["gw2"].machine.version == fed.server.version
    fed.flush()
    assert fed.of(agg.PublishMetrics)[-1].summary.participants == ("gw1", "gw2")


def test_restart_from_checkpoint_resumes_the_round_in_progress() -> None:
    fed = make(n_rounds=3)
    fed.start()
    fed.flush()  # round 1 done, round 2 announced and checkpointed
    checkpoint = [a for a in fed.actions if isinstance(a, agg.SaveCheckpoint)][-1].checkpoint
    round2_updates = list(fed.outbox)
    assert len(round2_updates) == 2
    fed.outbox.clear()  # the aggregator dies before reading them
    fresh = agg.RoundStateMachine(fed.server.config, fed.server.spec,
                                  [np.zeros((2, 1), np.float32), np.zeros((1,), np.float32)],
                                  fed.server.rng)
    fresh.restore(checkpoint)
    fed.server = fresh
    fed.actions.clear()
    fed.feed(agg.Started(fed.now))
    for g in fed.gateways.values():
        fed.feed(agg.DeviceOnline(fed.now, g.name))
    assert fed.server.round == 2 and fed.server.version == 1
    fed.flush()  # gateways resent their cached round-2 updates on the re-announcement
    fed.flush()
    assert fed.of(agg.RunFinished)[0].round == 3


def test_invalid_updates_are_rejected_not_raised() -> None:
    fed = make()
    fed.start()
    name, action = fed.outbox[0]
    bad_shape = action.update.delta.__class__((), ((3,),), action.update.delta.parts[:1])
    upd = action.update.__class__(round=1, base_version=0, num_samples=10, delta=bad_shape)
    fed.feed(agg.UpdateReceived(fed.now, name, "id-1", upd))
    stale = action.update.__class__(round=1, base_version=7, num_samples=10, delta=action.update.delta)
    fed.feed(agg.UpdateReceived(fed.now, name, "id-2", stale))
    zero = action.update.__class__(round=1, base_version=0, num_samples=0, delta=action.update.delta)
    fed.feed(agg.UpdateReceived(fed.now, name, "id-3", zero))
    assert [r.reason for r in fed.of(agg.UpdateRejected)] == ["bad_shape", "stale_base", "bad_samples"]


def test_norm_bound_rejects_a_huge_update() -> None:
    gws = [Gateway("gw1", 1.0, 100), Gateway("evil", 1e6, 100)]
    fed = Federation(gws, agg.RoundConfig(rounds=1, min_participants=1, max_update_norm=10.0))
    fed.start()
    fed.flush()
    assert [r.reason for r in fed.of(agg.UpdateRejected)] == ["norm_too_large"]
    assert fed.of(agg.PublishMetrics)[0].summary.participants == ("gw1",)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam"])
def test_server_optimizers_converge(name: str) -> None:
    from aggregator.server_optim import ServerOptimizerConfig

    lr = 1.0 if name == "fedavgm" else 0.3
    server = ServerOptimizerConfig(name=name, learning_rate=lr, momentum=0.5)
    gws = [Gateway("gw1", 2.0, 100), Gateway("gw2", 2.0, 100)]
    fed = Federation(gws, agg.RoundConfig(rounds=60, min_participants=2, server=server))
    fed.start()
    for _ in range(80):
        fed.flush()
    assert fed.of(agg.RunFinished)
    assert np.allclose(fed.server.weights[0], 2.0, atol=0.1)


def test_event_before_start_is_our_bug() -> None:
    fed = make()
    from fedcore.errors import LocalProtocolError

    with pytest.raises(LocalProtocolError):
        fed.server.handle(agg.Tick(0.0))


def test_a_gateway_that_stays_an_outlier_is_quarantined_until_released() -> None:
    gws = [Gateway("gw1", 1.0, 100), Gateway("gw2", 1.2, 100), Gateway("gw3", 0.8, 100),
           Gateway("evil", -50.0, 100)]
    # a quorum of all four: once "evil" is quarantined, three must be enough
    fed = Federation(gws, agg.RoundConfig(rounds=20, min_participants=4,
                                          reputation=ReputationConfig()))
    fed.server.fuse = make_fuse("median", {})  # with a robust rule the attacker stands out
    fed.start()
    for _ in range(6):
        fed.flush()
    (quarantined,) = fed.of(agg.GatewayQuarantined)
    assert quarantined.device == "evil" and quarantined.round == 3
    summary = [a.summary for a in fed.of(agg.PublishMetrics) if a.summary.round == 3][0]
    assert any("evil quarantined" in alert for alert in summary.alerts)
    later = [a.summary for a in fed.of(agg.PublishMetrics) if a.summary.round > 3]
    assert later and all("evil" not in s.participants for s in later)
    # its later updates are dropped: "quarantined", or "late" when the round closed first
    refused = [r for r in fed.of(agg.UpdateRejected) if r.device == "evil"]
    assert refused and {r.reason for r in refused} <= {"quarantined", "late"}
    assert "evil" in fed.server.checkpoint().meta["reputation"]["devices"]
    # the operator releases it: its next update counts again
    assert fed.server.release("evil") == [agg.GatewayReleased("evil", fed.server.round)]
    fed.flush()
    fed.flush()
    assert "evil" in fed.of(agg.PublishMetrics)[-1].summary.participants


def test_broker_that_lost_its_state_gets_model_and_round_again() -> None:
    fed = make(n_rounds=5)
    fed.start()
    fed.flush()
    fed.outbox.clear()  # the broker restarted: round-2 updates in flight are gone
    fed.retained_model = fed.retained_round = None
    fed.actions.clear()
    fed.feed(agg.BrokerSessionLost(fed.now))
    kinds = [type(a) for a in fed.actions]
    assert kinds == [agg.PublishModel, agg.PublishRound]
    assert fed.retained_round is not None and fed.retained_round.round == 2
    fed.flush()  # the gateways resent their cached round-2 updates
    assert fed.server.round == 3


def test_a_buffered_run_finishes_and_an_away_gateways_work_counts_with_its_staleness() -> None:
    from aggregator.buffered import BufferedConfig

    gws = [Gateway("gw1", 1.0, 100), Gateway("gw2", 3.0, 100), Gateway("gw3", 5.0, 100)]
    config = agg.RoundConfig(rounds=6, min_participants=2, mode="buffered",
                             buffered=BufferedConfig(buffer_size=2, max_staleness=3))
    fed = Federation(gws, config)
    fed.start()
    away = fed.gateways["gw3"]
    fed.disconnect(away)  # its update on version 0 is queued on a link that is down
    fed.flush(hold={"gw3"})  # gw1 + gw2 fill buffer 1: version 1
    fed.flush(hold={"gw3"})  # again on version 1: version 2
    assert fed.server.version == 2
    fed.reconnect(away)  # gets version 2 and trains on it; its old update goes out too
    while not fed.of(agg.RunFinished):
        before = len(fed.actions)
        fed.flush()
        assert len(fed.actions) > before, "the buffered run stalled"
    (finished,) = fed.of(agg.RunFinished)
    assert finished.round == 6 and finished.model_version == 6
    accepted = [a for a in fed.of(agg.UpdateAccepted) if a.device == "gw3"]
    # built on version 0, it arrives behind the two others' updates on version 2: folded at 3
    assert accepted[0].round == 1 and accepted[0].staleness == 3
    # nothing refused but what was still in flight when the run ended
    assert {r.reason for r in fed.of(agg.UpdateRejected)} <= {"finished"}
    # every accepted update pulls towards its gateway's target: the model sits among them
    assert 1.0 < float(fed.server.weights[0][0, 0]) < 5.0
