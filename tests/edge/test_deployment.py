"""Pure tests of which model a gateway runs for inference (edge.deployment)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.deployment import DeploymentFollower, DeploymentRefused, EvaluateCanary, RunModel, Running
from fedcore.protocol.messages import Deployment
from fedcore.protocol.tensors import Tensor, encode_tensors

OLD, NEW = "20261101T000000Z-aaaa", "20261202T103000Z-9f3a"


def weights(value: float) -> list[np.ndarray]:
    return [np.full((2, 3), value, np.float32), np.full((3,), -value, np.float32)]


def record(sequence: int, mode: str = "version", version: int = 4, lineage: str = OLD,
           **kw: object) -> Deployment:
    if mode != "latest":
        kw.setdefault("tensors", encode_tensors(weights(float(version))))
    return Deployment(sequence, lineage, mode, version, **kw)  # type: ignore[arg-type]


def canary_record(sequence: int, canary: tuple[str, ...], lineage: str = OLD) -> Deployment:
    return record(sequence, "canary", 4, lineage, candidate=5,
                  candidate_tensors=encode_tensors(weights(5.0)), canary=canary)


def same(a: list[np.ndarray] | None, b: list[np.ndarray]) -> bool:
    return a is not None and len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_before_any_record_the_newest_global_model_runs() -> None:
    follower = DeploymentFollower("gw1")
    assert follower.running == Running(-1, None, "latest") and follower.mode == "latest"


def test_a_version_record_runs_that_version_and_latest_returns_to_the_newest() -> None:
    follower = DeploymentFollower("gw1")
    (run,) = follower.on_record(record(0, "version", 4), OLD)
    assert isinstance(run, RunModel)
    assert run.running.version == 4 and run.running.role == "deployed"
    assert same(run.running.weights, weights(4.0))
    assert (follower.sequence, follower.lineage, follower.mode) == (0, OLD, "version")
    (back,) = follower.on_record(record(1, "latest"), OLD)
    assert back == RunModel(Running(-1, None, "latest")) and follower.mode == "latest"


def test_a_canary_gateway_runs_the_candidate_and_evaluates_both() -> None:
    follower = DeploymentFollower("gw2")
    run, evaluate = follower.on_record(canary_record(3, ("gw1", "gw2")), OLD)
    assert isinstance(run, RunModel) and run.running.version == 5 and run.running.role == "candidate"
    assert same(run.running.weights, weights(5.0))
    assert isinstance(evaluate, EvaluateCanary)
    assert (evaluate.sequence, evaluate.candidate, evaluate.incumbent) == (3, 5, 4)
    assert same(evaluate.candidate_weights, weights(5.0))
    assert same(evaluate.incumbent_weights, weights(4.0))


def test_a_gateway_outside_the_canary_runs_the_incumbent() -> None:
    follower = DeploymentFollower("gw9")
    (run,) = follower.on_record(canary_record(3, ("gw1", "gw2")), OLD)
    assert run.running.version == 4 and run.running.role == "deployed"
    assert same(run.running.weights, weights(4.0))


def test_an_older_record_of_the_lineage_is_a_replay_and_the_same_one_is_nothing_new() -> None:
    follower = DeploymentFollower("gw1")
    follower.on_record(record(5, version=4), OLD)
    assert follower.on_record(record(5, version=4), OLD) == []  # the retained record again
    assert follower.on_record(record(4, version=1), OLD) == [DeploymentRefused(4, "replayed")]
    assert follower.on_record(record(0, "latest"), OLD) == [DeploymentRefused(0, "replayed")]
    assert follower.running.version == 4 and follower.sequence == 5
    (run,) = follower.on_record(record(6, version=2), OLD)
    assert run.running.version == 2


def test_the_position_survives_a_restart() -> None:
    follower = DeploymentFollower("gw1", sequence=7, lineage=OLD)
    assert follower.on_record(record(3), OLD) == [DeploymentRefused(3, "replayed")]
    # the retained record at the saved position is applied once by the new process
    (run,) = follower.on_record(record(7, version=5), OLD)
    assert run.running.version == 5
    assert follower.on_record(record(7, version=5), OLD) == []


def test_a_newer_lineage_starts_its_sequence_again() -> None:
    follower = DeploymentFollower("gw1")
    follower.on_record(record(7, version=9), OLD)
    (run,) = follower.on_record(record(0, version=1, lineage=NEW), OLD)  # before its model
    assert run.running.version == 1 and (follower.lineage, follower.sequence) == (NEW, 0)
    (run,) = follower.on_record(record(1, version=2, lineage=NEW), NEW)
    assert run.running.version == 2


def test_a_record_of_an_older_lineage_is_refused() -> None:
    follower = DeploymentFollower("gw1")
    follower.on_record(record(0, version=1, lineage=NEW), NEW)
    # a replayed record of the old lineage, with a higher sequence
    assert follower.on_record(record(8, version=9, lineage=OLD), NEW) == [
        DeploymentRefused(8, "old_lineage")]
    # older than the lineage the participant follows, whatever was applied before
    fresh = DeploymentFollower("gw1")
    assert fresh.on_record(record(0, lineage=OLD), NEW) == [DeploymentRefused(0, "old_lineage")]
    # older than the one applied, though the participant has not followed it yet
    assert follower.on_record(record(9, version=9, lineage=OLD), OLD) == [
        DeploymentRefused(9, "old_lineage")]
    assert follower.running.version == 1 and follower.lineage == NEW


def test_a_malformed_record_is_refused_and_changes_nothing() -> None:
    follower = DeploymentFollower("gw1")
    follower.on_record(record(0, version=3), OLD)
    before = (follower.sequence, follower.lineage, follower.mode, follower.running)
    assert follower.on_record(record(1, tensors=()), OLD) == [DeploymentRefused(1, "bad_deployment")]
    no_candidate = record(2, "canary", candidate=5, canary=("gw1",))
    assert follower.on_record(no_candidate, OLD) == [DeploymentRefused(2, "bad_deployment")]
    assert follower.on_record(record(3, "rollout"), OLD) == [DeploymentRefused(3, "bad_mode")]
    broken = (Tensor("<f4", (2, 3), b"\x00" * 5),)
    assert follower.on_record(record(4, tensors=broken), OLD) == [DeploymentRefused(4, "bad_length")]
    nan = encode_tensors([np.full((2,), np.nan, np.float32)])
    assert follower.on_record(record(5, tensors=nan), OLD) == [DeploymentRefused(5, "not_finite")]
    assert (follower.sequence, follower.lineage, follower.mode, follower.running) == before
    # a good record after them is applied: refusals do not move the position
    (run,) = follower.on_record(record(1, version=6), OLD)
    assert run.running.version == 6


tensor = st.builds(Tensor, st.sampled_from(["<f4", "<f8", "|i1", "<i8", "|u1", "<f2", ">f4", "O", ""]),
                   st.lists(st.integers(-3, 2**40), max_size=4).map(tuple), st.binary(max_size=64))
records = st.builds(
    Deployment, st.integers(-5, 20), st.sampled_from([OLD, NEW, "", "zzz"]),
    st.sampled_from(["latest", "version", "canary", "", "x"]), st.integers(-2, 9),
    st.lists(tensor, max_size=3).map(tuple), st.integers(-2, 9), st.lists(tensor, max_size=3).map(tuple),
    st.lists(st.sampled_from(["gw1", "gw2"]), max_size=2).map(tuple))


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(records, min_size=1, max_size=8), st.sampled_from([OLD, NEW]))
def test_no_record_makes_the_follower_raise(sequence: list[Deployment], lineage: str) -> None:
    follower = DeploymentFollower("gw1", max_elements=1024)
    for rec in sequence:
        before = (follower.sequence, follower.lineage)
        actions = follower.on_record(rec, lineage)
        assert all(isinstance(a, RunModel | EvaluateCanary | DeploymentRefused) for a in actions)
        if actions and isinstance(actions[0], DeploymentRefused):
            assert (follower.sequence, follower.lineage) == before
        elif actions:
            assert (follower.sequence, follower.lineage) == (rec.sequence, rec.lineage)
