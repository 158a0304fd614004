"""Pure tests of the participant in buffered mode: it trains on the newest model it holds
without waiting for a round, and sends a result built on an older model instead of dropping it."""

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


def ann(round_: int, version: int, mode: str = "buffered") -> RoundAnnouncement:
    return RoundAnnouncement(round=round_, model_version=version, deadline=0.0, mode=mode)


def trained(action: edge.StartTraining, value: float) -> edge.TrainingFinished:
    weights = [w + value for w in action.weights]
    return edge.TrainingFinished(0.0, action.round, action.base_version, weights, 10, 0.5, {},
                                 action.lineage)


def first_delta(publish: edge.PublishUpdate) -> float:
    return float(np.frombuffer(publish.update.delta.parts[0].data, np.float32)[0])


def test_a_result_on_an_older_model_is_sent_with_its_base_then_training_restarts_on_the_newest() -> None:
    p = edge.Participant("gw1")
    m0 = model(0, value=2.0)
    p.handle(edge.ModelReceived(0.0, m0))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    assert isinstance(start, edge.StartTraining) and start.base_version == 0
    # while it trains, the aggregator flushes a buffer: version 1 (weights 5.0) and buffer 2
    installed = p.handle(edge.ModelReceived(0.0, model(1, parent=body_hash(m0), value=5.0)))
    assert [type(a) for a in installed] == [edge.InstallModel]  # busy: no second training
    assert p.handle(edge.RoundAnnounced(0.0, ann(2, 1))) == []
    publish, restart = p.handle(trained(start, 0.25))
    assert isinstance(publish, edge.PublishUpdate)
    assert (publish.update.round, publish.update.base_version) == (1, 0)
    assert first_delta(publish) == 0.25  # relative to version 0's weights, not version 1's
    assert isinstance(restart, edge.StartTraining)
    assert (restart.round, restart.base_version) == (2, 1)
    assert float(restart.weights[0][0, 0]) == 5.0


def test_it_trains_once_per_model_version_and_on_each_new_one() -> None:
    p = edge.Participant("gw1")
    m0 = model(0)
    p.handle(edge.ModelReceived(0.0, m0))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    (publish,) = p.handle(trained(start, 1.0))
    assert isinstance(publish, edge.PublishUpdate)
    # a retained re-delivery of the same announcement re-sends, it does not retrain
    (again,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    assert isinstance(again, edge.PublishUpdate) and again.resend
    assert again.message_id == publish.message_id
    # the next version arrives before its announcement: wait for the announcement's config
    m1 = model(1, parent=body_hash(m0))
    assert [type(a) for a in p.handle(edge.ModelReceived(0.0, m1))] == [edge.InstallModel]
    (start2,) = p.handle(edge.RoundAnnounced(0.0, ann(2, 1)))
    assert isinstance(start2, edge.StartTraining) and start2.base_version == 1


def test_a_gateway_back_from_away_trains_on_the_newest_retained_model() -> None:
    p = edge.Participant("gw1")
    m0 = model(0)
    p.handle(edge.ModelReceived(0.0, m0))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0)))
    (publish,) = p.handle(trained(start, 1.0))  # queued on a link that is down
    # back online: the retained model (version 7) and announcement (buffer 8)
    assert [type(a) for a in p.handle(edge.ModelReceived(0.0, model(7, value=3.0)))] == [edge.InstallModel]
    (start7,) = p.handle(edge.RoundAnnounced(0.0, ann(8, 7)))
    assert isinstance(start7, edge.StartTraining) and (start7.round, start7.base_version) == (8, 7)


def test_a_synchronous_announcement_still_waits_for_its_round() -> None:
    p = edge.Participant("gw1")
    m0 = model(0)
    p.handle(edge.ModelReceived(0.0, m0))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, mode="sync")))
    p.handle(edge.ModelReceived(0.0, model(1, parent=body_hash(m0))))
    # the round moved on while training: a synchronous result is obsolete, nothing is sent
    assert p.handle(trained(start, 1.0)) == []


def test_a_switch_to_buffered_during_a_synchronous_training_trains_once_it_returns() -> None:
    p = edge.Participant("gw1")
    p.handle(edge.ModelReceived(0.0, model(0)))
    (start,) = p.handle(edge.RoundAnnounced(0.0, ann(1, 0, mode="sync")))
    # the aggregator restarted with mode = "buffered": it re-announces buffer 1 on version 0
    assert p.handle(edge.RoundAnnounced(0.0, ann(1, 0))) == []  # busy
    (restart,) = p.handle(trained(start, 1.0))  # the synchronous result has no round left
    assert isinstance(restart, edge.StartTraining) and restart.base_version == 0
    (publish,) = p.handle(trained(restart, 1.0))
    assert isinstance(publish, edge.PublishUpdate) and publish.update.base_version == 0
