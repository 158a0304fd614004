"""Pure tests of the gateway's participant state machine."""

from __future__ import annotations

import numpy as np

from edge import participant as edge
from fedcore.protocol.codec import body_hash
from fedcore.protocol.messages import GlobalModel, ModelSpec, RoundAnnouncement
from fedcore.protocol.tensors import encode_tensors

SPEC = ModelSpec(kind="mlp", layer_sizes=(1, 1))


def model(version: int, parent: bytes = b"", value: float = 0.0) -> GlobalModel:
    w = [np.full((1, 1), value, np.float32), np.zeros((1,), np.float32)]
    return GlobalModel(version, version, parent, SPEC, encode_tensors(w))


def ann(round_: int, version: int, selected: tuple[str, ...] = ()) -> RoundAnnouncement:
    return RoundAnnouncement(round=round_, model_version=version, deadline=0.0, selected=selected)


def trained(action: edge.StartTraining, value: float = 1.0) -> edge.TrainingFinished:
    weights = [w + value for w in action.weights]
    return edge.TrainingFinished(0.0, action.round, action.base_version, weights, 10, 0.5, {},
                                 action.lineage)


def test_waits_for_the_announced_model_then_trains_and_publishes_the_delta() -> None:
    p = edge.Participant("gw1")
    assert p.handle(edge.RoundAnnounced(0.0, ann(1, 0))) == []
    actions = p.handle(edge.ModelReceived(0.0, model(0, value=2.0)))
    assert [type(a) for a in actions] == [edge.InstallModel, edge.StartTraining]
    start = actions[1]
    (publish,) = p.handle(trained(start, 0.25))
    assert isinstance(publish, edge.PublishUpdate)
    assert publish.update.round == 1 and publish.update.base_version == 0
    delta = np.frombuffer(publish.update.delta.parts[0].data, np.float32)
    assert np.allclose(delta, 0.25)


def test_older_or_equal_models_are_ignored_and_a_broken_chain_is_refused() -> None:
    p = edge.Participant("gw1")
    m0 = model(0)
    p.handle(edge.ModelReceived(0.0, m0))
    assert p.handle(edge.ModelReceived(0.0, m0)) == []
    (refused,) = p.handle(edge.ModelReceived(0.0, model(1, parent=b"x" * 32)))
    assert isinstance(refused, edge.ModelRefused) and refused.reason == "bad_parent"
    assert p.version == 0
    ok = p.handle(edge.ModelReceived(0.0, model(1, parent=body_hash(m0))))
    assert isinstance(ok[0], edge.InstallModel) and p.version == 1
    # a gateway that missed versions accepts a later one (its signature is checked upstream)
    assert isinstance(p.handle(edge.ModelReceived(0.0, model(5, parent=b"y")))[0], edge.InstallModel)


def test_gateway_not_selected_sits_out() -> None:
    p = edge.Participant("gw1")
    p.handle(edge.ModelReceived(0.0, model(0)))
    (out,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, selected=("gw2",))))
    assert isinstance(out, edge.SatOut)


def test_reannouncement_resends_the_cached_update_with_the_same_id() -> None:
    p = edge.Participant("gw1")
    p.handle(edge.ModelReceived(0.0, model(0)))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    (first,) = p.handle(trained(start))
    (again,) = p.handle(edge.RoundAnnounced(1.0, ann(1, 0)))
    assert again.resend and again.message_id == first.message_id and again.update == first.update


def test_training_result_for_a_superseded_round_is_discarded() -> None:
    p = edge.Participant("gw1")
    m0 = model(0)
    p.handle(edge.ModelReceived(0.0, m0))
    (start1,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    # while training round 1, the aggregator closed it without us and moved on
    p.handle(edge.ModelReceived(0.0, model(1, parent=body_hash(m0))))
    assert p.handle(edge.RoundAnnounced(0.0, ann(2, 1))) == []
    actions = p.handle(trained(start1))
    assert [type(a) for a in actions] == [edge.StartTraining]
    assert actions[0].round == 2 and actions[0].base_version == 1


def test_failed_training_sits_the_round_out_and_the_next_round_trains() -> None:
    p = edge.Participant("gw1")
    p.handle(edge.ModelReceived(0.0, model(0)))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    (out,) = p.handle(edge.TrainingFailed(0.0, start.round, "training diverged"))
    assert isinstance(out, edge.SatOut) and out.reason == "training diverged"
    assert p.phase is edge.ParticipantPhase.READY
    (again,) = p.handle(edge.RoundAnnounced(1.0, ann(2, 0)))
    assert isinstance(again, edge.StartTraining) and again.round == 2
