"""Pure tests of the participant's lineages and statistics rounds (edge.participant)."""

from __future__ import annotations

import numpy as np

from edge import participant as edge
from fedcore.protocol.codec import body_hash
from fedcore.protocol.messages import GlobalModel, ModelSpec, RoundAnnouncement
from fedcore.protocol.tensors import encode_tensors

OLD, NEW = "20261101T000000Z-aaaa", "20261202T103000Z-9f3a"
SPEC = ModelSpec(kind="mlp", layer_sizes=(1, 1))


def model(version: int, lineage: str, value: float = 0.0, parent: bytes = b"") -> GlobalModel:
    w = [np.full((1, 1), value, np.float32), np.zeros((1,), np.float32)]
    return GlobalModel(version, version, parent, SPEC, encode_tensors(w), lineage=lineage)


def ann(round_: int, version: int, lineage: str, purpose: str = "train") -> RoundAnnouncement:
    return RoundAnnouncement(round=round_, model_version=version, deadline=0.0, lineage=lineage,
                             purpose=purpose)


def trained(start: edge.StartTraining, step: float = 1.0) -> edge.TrainingFinished:
    return edge.TrainingFinished(0.0, start.round, start.base_version,
                                 [w + step for w in start.weights], 10, 0.5, {}, start.lineage)


def kinds(actions: list[edge.Action]) -> list[type]:
    return [type(a) for a in actions]


def on_old_lineage_after_round_1() -> tuple[edge.Participant, edge.PublishUpdate]:
    """A gateway of lineage OLD holding version 0 that sent its update for round 1."""
    p = edge.Participant("gw1", lineage=OLD)
    p.handle(edge.ModelReceived(0.0, model(0, OLD, value=1.0)))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, OLD)))
    (sent,) = p.handle(trained(start))
    assert isinstance(sent, edge.PublishUpdate)
    return p, sent


def test_a_newer_lineage_model_replaces_the_model_and_the_cached_update() -> None:
    p, sent = on_old_lineage_after_round_1()
    actions = p.handle(edge.ModelReceived(1.0, model(0, NEW, value=7.0)))
    assert actions[0] == edge.LineageChanged(OLD, NEW)
    assert isinstance(actions[1], edge.InstallModel) and len(actions) == 2
    assert p.lineage == NEW and p.version == 0 and float(p.weights[0][0, 0]) == 7.0
    # round 1 on version 0 again, in the new lineage: trained afresh, not the old update
    (start,) = p.handle(edge.RoundAnnounced(2.0, ann(1, 0, NEW)))
    assert isinstance(start, edge.StartTraining) and float(start.weights[0][0, 0]) == 7.0
    (new_sent,) = p.handle(trained(start, 0.5))
    assert isinstance(new_sent, edge.PublishUpdate) and not new_sent.resend
    assert new_sent.message_id != sent.message_id


def test_a_newer_lineage_model_drops_the_round_pending_in_the_old_one() -> None:
    p = edge.Participant("gw1", lineage=OLD)
    p.handle(edge.ModelReceived(0.0, model(0, OLD)))
    assert p.handle(edge.RoundAnnounced(0.0, ann(2, 1, OLD))) == []  # waits for version 1
    actions = p.handle(edge.ModelReceived(1.0, model(1, NEW)))
    assert kinds(actions) == [edge.LineageChanged, edge.InstallModel]  # no training of OLD's round
    assert p.pending is None


def test_the_first_model_of_a_newer_lineage_installs_even_at_a_lower_version() -> None:
    p = edge.Participant("gw1", lineage=OLD)
    p.handle(edge.ModelReceived(0.0, model(40, OLD)))
    actions = p.handle(edge.ModelReceived(1.0, model(0, NEW, parent=b"z" * 32)))
    assert kinds(actions) == [edge.LineageChanged, edge.InstallModel] and p.version == 0


def test_an_older_lineage_is_refused_and_changes_nothing() -> None:
    p, sent = on_old_lineage_after_round_1()
    p.handle(edge.ModelReceived(1.0, model(0, NEW, value=7.0)))
    assert p.handle(edge.ModelReceived(2.0, model(5, OLD))) == [edge.ModelRefused(5, "old_lineage")]
    assert p.handle(edge.RoundAnnounced(2.0, ann(1, 0, OLD))) == [edge.SatOut(1, "old_lineage")]
    assert p.handle(edge.RoundAnnounced(2.0, ann(0, 0, OLD, "statistics"))) == [
        edge.SatOut(0, "old_lineage")]
    assert p.lineage == NEW and p.version == 0 and float(p.weights[0][0, 0]) == 7.0
    # the empty id (an aggregator from before lineages) is older than every lineage
    fresh = edge.Participant("gw1", lineage=NEW)
    assert kinds(fresh.handle(edge.ModelReceived(0.0, model(0, "")))) == [edge.ModelRefused]


def test_a_statistics_round_is_answered_without_a_model() -> None:
    p = edge.Participant("gw1")
    assert p.handle(edge.RoundAnnounced(0.0, ann(0, -1, NEW, "statistics"))) == [
        edge.SendStatistics(0, NEW)]
    # on a newer lineage than the one held, the answer names the announced lineage
    q, _ = on_old_lineage_after_round_1()
    assert q.handle(edge.RoundAnnounced(1.0, ann(0, -1, NEW, "statistics"))) == [
        edge.SendStatistics(0, NEW)]


def test_a_statistics_round_respects_the_selection() -> None:
    p = edge.Participant("gw1")
    selected = RoundAnnouncement(0, -1, 0.0, selected=("gw2",), lineage=NEW, purpose="statistics")
    assert p.handle(edge.RoundAnnounced(0.0, selected)) == [edge.SatOut(0, "not_selected")]


def test_a_round_of_a_newer_lineage_waits_for_its_model_then_trains() -> None:
    p, _ = on_old_lineage_after_round_1()
    assert p.handle(edge.RoundAnnounced(1.0, ann(1, 0, NEW))) == []
    assert p.lineage == OLD  # an announcement alone does not switch
    # a late model of the old lineage does not start the new lineage's round
    m0 = p.model
    later_old = p.handle(edge.ModelReceived(1.5, model(1, OLD, parent=body_hash(m0))))
    assert kinds(later_old) == [edge.InstallModel]
    actions = p.handle(edge.ModelReceived(2.0, model(0, NEW, value=3.0)))
    assert kinds(actions) == [edge.LineageChanged, edge.InstallModel, edge.StartTraining]
    start = actions[2]
    assert (start.round, start.base_version) == (1, 0) and float(start.weights[0][0, 0]) == 3.0
    (sent,) = p.handle(trained(start, 0.25))
    delta = np.frombuffer(sent.update.delta.parts[0].data, np.float32)
    assert np.allclose(delta, 0.25)


# A training started in the old lineage may still be running (the participant runs it in a
# worker) when the new lineage arrives: its result was trained from the old lineage's model
# and must never become an update of the new lineage's round.


def test_a_training_of_the_old_lineage_is_not_sent_for_the_new_lineages_round() -> None:
    p = edge.Participant("gw1", lineage=OLD)
    p.handle(edge.ModelReceived(0.0, model(0, OLD, value=1.0)))
    (old_start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, OLD)))
    # while it trains, the aggregator starts a new lineage: round 1 on its version 0
    assert p.handle(edge.RoundAnnounced(1.0, ann(1, 0, NEW))) == []
    actions = p.handle(trained(old_start))
    assert not [a for a in actions if isinstance(a, edge.PublishUpdate)], actions


def test_a_training_of_the_old_lineage_does_not_replace_the_new_lineages_training() -> None:
    p = edge.Participant("gw1", lineage=OLD)
    p.handle(edge.ModelReceived(0.0, model(0, OLD, value=1.0)))
    (old_start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, OLD)))
    p.handle(edge.RoundAnnounced(1.0, ann(1, 0, NEW)))
    actions = p.handle(edge.ModelReceived(2.0, model(0, NEW, value=5.0)))
    new_start = actions[-1]
    assert isinstance(new_start, edge.StartTraining) and float(new_start.weights[0][0, 0]) == 5.0
    # the old training returns first: it is obsolete
    assert not [a for a in p.handle(trained(old_start)) if isinstance(a, edge.PublishUpdate)]
    # the new lineage's training is the one sent, as a delta on the new model
    (sent,) = p.handle(trained(new_start, 0.25))
    assert isinstance(sent, edge.PublishUpdate)
    assert np.allclose(np.frombuffer(sent.update.delta.parts[0].data, np.float32), 0.25)
