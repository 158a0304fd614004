"""Fusion rules against hand-computed cases and robustness properties."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator import robust
from fedcore.learning.params import Params, flatten


def one_d(*values: float) -> list[Params]:
    return [[np.array([v], dtype=np.float32)] for v in values]


def rows(*vectors: list[float]) -> list[Params]:
    return [[np.array(v, dtype=np.float32)] for v in vectors]


def value(params: Params) -> list[float]:
    return [float(x) for x in np.concatenate([p.ravel() for p in params])]


# ---- hand-computed cases ------------------------------------------------------------------


def test_fedavg_weights_by_sample_count() -> None:
    # (1*0 + 3*4) / 4 = 3
    assert value(robust.fedavg(one_d(0, 4), [1, 3])) == [3.0]


def test_median_odd_and_even() -> None:
    assert value(robust.coordinate_median(one_d(1, 2, 100))) == [2.0]
    assert value(robust.coordinate_median(one_d(1, 2, 3, 100))) == [2.5]


def test_trimmed_mean_trims_each_coordinate_independently() -> None:
    updates = rows([1, 50], [2, 40], [3, 30], [4, 20], [100, -1000])
    # floor(0.2 * 5) = 1 per side: column 0 keeps 2,3,4; column 1 keeps 20,30,40
    assert value(robust.trimmed_mean(updates, 0.2)) == [3.0, 30.0]


def test_trimmed_mean_with_too_few_updates_becomes_the_median() -> None:
    # floor(0.4 * 3) = 1 per side leaves exactly the middle value
    assert value(robust.trimmed_mean(one_d(0, 1, 50), 0.4)) == [1.0]
    assert value(robust.trimmed_mean(one_d(0, 2), 0.49)) == [1.0]  # k capped at 0


def test_krum_scores_and_choice() -> None:
    # f = 0, n = 4: two nearest neighbours. 0: 1+9=10, 1: 1+4=5, 3: 4+9=13, 10: 49+81=130
    updates = one_d(0, 1, 3, 10)
    assert robust.krum_scores(updates, 0).tolist() == [10.0, 5.0, 13.0, 130.0]
    assert value(robust.krum(updates, 0)) == [1.0]


def test_multi_krum_averages_the_best_m_by_weight() -> None:
    updates = one_d(0, 1, 3, 10)
    assert value(robust.multi_krum(updates, 0, 2)) == [0.5]
    # weights 3 and 1 on the chosen 0 and 1: (3*0 + 1*1) / 4
    assert value(robust.multi_krum(updates, 0, 2, weights=[3, 1, 1, 1])) == [0.25]
    # m = 0 means n - f = 3 best: 0, 1, 3
    assert value(robust.multi_krum(updates, 1, 0))[0] == pytest.approx(4 / 3)


def test_geometric_median_in_one_dimension_is_the_weighted_median() -> None:
    got = robust.geometric_median(one_d(0, 1, 10), [1, 1, 1], iters=500, eps=1e-9)
    assert value(got)[0] == pytest.approx(1.0, abs=1e-3)
    # 10 carries 5 of 7 weight: more than half, so it is the weighted median
    got = robust.geometric_median(one_d(0, 1, 10), [1, 1, 5], iters=500, eps=1e-9)
    assert value(got)[0] == pytest.approx(10.0, abs=1e-3)


def test_geometric_median_of_a_square_is_its_centre() -> None:
    got = robust.geometric_median(rows([0, 0], [2, 0], [0, 2], [2, 2]), [1, 1, 1, 1])
    assert value(got) == pytest.approx([1.0, 1.0], abs=1e-5)


def test_norm_bound_clips_only_long_updates() -> None:
    clipped = robust.norm_bound(rows([3, 4], [0.3, 0.4]), 1.0)
    assert value(clipped[0]) == pytest.approx([0.6, 0.8])
    assert value(clipped[1]) == pytest.approx([0.3, 0.4])


def test_fltrust_hand_case() -> None:
    server: Params = [np.array([1, 0], dtype=np.float32)]
    # [3,4]: cosine 0.6, rescaled to norm 1 -> [0.6, 0.8]; [2,0]: cosine 1 -> [1, 0];
    # [-1,0] and [0,5]: cosine <= 0, no trust. (0.6*[0.6,0.8] + [1,0]) / 1.6 = [0.85, 0.3]
    updates = rows([3, 4], [2, 0], [-1, 0], [0, 5])
    assert robust.fltrust_trust(updates, server).tolist() == pytest.approx([0.6, 1.0, 0.0, 0.0])
    assert value(robust.fltrust(updates, server)) == pytest.approx([0.85, 0.3])


def test_fltrust_with_no_trusted_client_takes_no_step() -> None:
    server: Params = [np.array([1, 0], dtype=np.float32)]
    assert value(robust.fltrust(rows([-1, 0], [0, 3]), server)) == [0.0, 0.0]


def test_outlier_distances() -> None:
    fused: Params = [np.zeros(2, dtype=np.float32)]
    assert robust.outlier_distances(rows([0, 0], [3, 4]), fused) == [0.0, 5.0]


# ---- properties ---------------------------------------------------------------------------


def layered(rng: np.random.Generator, centre: float, spread: float) -> Params:
    return [
        (centre + spread * rng.standard_normal((3, 4))).astype(np.float32),
        (centre + spread * rng.standard_normal(4)).astype(np.float32),
    ]


@pytest.mark.parametrize("seed", range(5))
def test_median_and_trimmed_mean_resist_one_huge_outlier(seed: int) -> None:
    rng = np.random.default_rng(seed)
    benign = [layered(rng, 1.0, 0.1) for _ in range(9)]
    attacker = layered(rng, 1e6, 1.0)
    updates = [*benign, attacker]
    lo = np.min([flatten(u) for u in benign], axis=0)
    hi = np.max([flatten(u) for u in benign], axis=0)
    for fused in (robust.coordinate_median(updates), robust.trimmed_mean(updates, 0.1)):
        flat = flatten(fused)
        assert np.all(flat >= lo) and np.all(flat <= hi)
    assert np.all(flatten(robust.fedavg(updates, [1] * 10)) > 1e4)  # FedAvg does not


@pytest.mark.parametrize("seed", range(5))
def test_krum_picks_a_benign_update(seed: int) -> None:
    rng = np.random.default_rng(seed)
    benign = [layered(rng, 0.0, 0.1) for _ in range(7)]
    attackers = [layered(rng, 5.0, 0.01) for _ in range(2)]
    updates = [*attackers, *benign]
    chosen = flatten(robust.krum(updates, 2))
    assert any(np.array_equal(chosen, flatten(b)) for b in benign)
    result = robust.fuse("multi_krum", updates, [1] * 9, params={"num_byzantine": 2})
    assert result.per_client_info["selected"][:2] == (0.0, 0.0)
    assert sum(result.per_client_info["selected"]) == 7


def test_geometric_median_resists_a_minority() -> None:
    rng = np.random.default_rng(1)
    benign = [layered(rng, 0.0, 0.1) for _ in range(7)]
    attackers = [layered(rng, 100.0, 0.0) for _ in range(3)]
    fused = flatten(robust.geometric_median([*benign, *attackers], [1] * 10))
    assert float(np.abs(fused).max()) < 1.0


@pytest.mark.parametrize("seed", range(3))
def test_fedavg_matches_numpy_weighted_average_and_keeps_shapes(seed: int) -> None:
    rng = np.random.default_rng(seed)
    updates = [layered(rng, 0.0, 1.0) for _ in range(6)]
    weights = rng.integers(1, 100, size=6).astype(float).tolist()
    fused = robust.fuse("fedavg", updates, weights).params
    assert [p.shape for p in fused] == [(3, 4), (4,)]
    assert all(p.dtype == np.float32 for p in fused)
    for layer in range(2):
        expected = np.average([u[layer] for u in updates], axis=0, weights=weights)
        np.testing.assert_allclose(fused[layer], expected, rtol=1e-5, atol=1e-6)


# ---- the registry -------------------------------------------------------------------------


def test_every_registered_rule_fuses_a_round() -> None:
    rng = np.random.default_rng(0)
    updates = [layered(rng, 0.0, 1.0) for _ in range(5)]
    server = layered(rng, 0.0, 1.0)
    for rule in robust.FUSION_RULES:
        result = robust.fuse(rule, updates, [1, 2, 3, 4, 5], server_update=server)
        assert [p.shape for p in result.params] == [(3, 4), (4,)]
        assert len(result.per_client_info["distance"]) == 5
        assert all(len(v) == 5 for v in result.per_client_info.values())


def test_max_norm_clips_before_any_rule() -> None:
    result = robust.fuse("median", rows([3, 4], [0, 0.5], [0, 1]), [1, 1, 1], params={"max_norm": 1.0})
    # clipped inputs [0.6, 0.8], [0, 0.5], [0, 1] -> per-coordinate median [0, 0.8]
    assert value(result.params) == pytest.approx([0.0, 0.8])
    assert result.per_client_info["clip_scale"] == pytest.approx((0.2, 1.0, 1.0))
    # the distance is from the update as sent, so clipping does not hide an oversized one
    assert result.per_client_info["distance"][0] == pytest.approx(np.hypot(3, 4 - 0.8))


@pytest.mark.parametrize(
    ("rule", "params", "words"),
    [
        ("bogus", {}, ["bogus", "fedavg"]),
        ("trimmed_mean", {"trim_fraction": 0.5}, ["trimmed_mean", "trim_fraction", "[0, 0.5)"]),
        ("trimmed_mean", {"trim": 0.1}, ["trimmed_mean", "'trim'", "trim_fraction"]),
        ("krum", {"num_byzantine": 1.5}, ["krum", "num_byzantine"]),
        ("krum", {"num_byzantine": -1}, ["krum", "num_byzantine"]),
        ("krum", {"num_byzantine": True}, ["krum", "num_byzantine", "not a number"]),
        ("geometric_median", {"eps": 0}, ["geometric_median", "eps"]),
        ("norm_bound", {"max_norm": 0}, ["norm_bound", "max_norm"]),
        ("fedavg", {"max_norm": "big"}, ["fedavg", "max_norm"]),
    ],
)
def test_bad_rule_or_parameter_is_named(rule: str, params: dict[str, object], words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        robust.check_rule(rule, params)
    for word in words:
        assert word in str(info.value)


def test_fuse_refuses_inconsistent_inputs() -> None:
    with pytest.raises(ValueError, match="fltrust"):
        robust.fuse("fltrust", one_d(1, 2), [1, 1])
    with pytest.raises(ValueError, match="shapes"):
        robust.fuse("fedavg", [*one_d(1), *rows([1, 2])], [1, 1])
    with pytest.raises(ValueError, match="weights"):
        robust.fuse("median", one_d(1, 2), [1])
    with pytest.raises(ValueError, match="no updates"):
        robust.fuse("median", [], [])
    with pytest.raises(ValueError, match="finite"):
        robust.fuse("median", one_d(1, float("nan")), [1, 1])


def test_krum_with_fewer_updates_than_its_guarantee_still_answers() -> None:
    assert value(robust.krum(one_d(1, 5), 3)) == [1.0]
    assert value(robust.krum(one_d(7), 1)) == [7.0]


def test_config_binding_uses_the_registry() -> None:
    from aggregator.fusion import make_fuse

    fuse = make_fuse("trimmed_mean", {"trim_fraction": 0.2})
    assert value(fuse(one_d(1, 2, 3, 4, 100), [1] * 5, one_d(0)[0])) == [3.0]
    with pytest.raises(ValueError, match="trim_fraction"):
        make_fuse("trimmed_mean", {"trim_fraction": 0.9})


# ---- hypothesis properties ----------------------------------------------------------------

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, width=32)
rounds = st.integers(min_value=1, max_value=7).flatmap(
    lambda n: st.tuples(
        st.lists(st.lists(finite, min_size=3, max_size=3), min_size=n, max_size=n),
        st.lists(st.integers(min_value=1, max_value=50), min_size=n, max_size=n),
        st.permutations(range(n)),
    )
)


@settings(max_examples=60, deadline=None)
@given(rounds)
def test_rules_ignore_arrival_order_and_stay_in_the_inputs_box(case: tuple[list[list[float]], list[int], list[int]]) -> None:
    vectors, weights, order = case
    updates = rows(*vectors)
    shuffled = [updates[i] for i in order]
    shuffled_weights = [weights[i] for i in order]
    lo, hi = np.min(vectors, axis=0), np.max(vectors, axis=0)
    for rule in ("fedavg", "median", "trimmed_mean", "geometric_median"):
        a = flatten(robust.fuse(rule, updates, weights).params)
        b = flatten(robust.fuse(rule, shuffled, shuffled_weights).params)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
        assert np.all(a >= lo - 1e-3) and np.all(a <= hi + 1e-3), rule
    chosen = flatten(robust.krum(updates, 1))
    assert any(np.array_equal(chosen, np.float32(v)) for v in vectors)


# ---- the sample-share cap --------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "share", "expected"), [
    ([1e9, 1000, 1000, 1000], 0.5, [3000, 1000, 1000, 1000]),  # a liar gets half, not all
    ([500, 300, 200], 0.4, [1000 / 3, 300, 200]),
    ([100, 100, 100], 0.5, [100, 100, 100]),  # within the share: unchanged
    ([1e9, 1000], 0.5, [1000, 1000]),  # two gateways, half each at most: equal
    ([900, 50, 50], 0.3, [50, 50, 50]),  # 3 x 0.3 < 1: no cap fits, equal weights
    ([5, 1], 0.0, [5, 1]),  # off
])
def test_cap_shares(weights: list[float], share: float, expected: list[float]) -> None:
    assert robust.cap_shares(weights, share) == pytest.approx(expected)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(1e-3, 1e12), min_size=1, max_size=20), st.floats(0.05, 0.95))
def test_capped_weights_respect_the_share_and_only_lower(weights: list[float], share: float) -> None:
    capped = robust.cap_shares(weights, share)
    assert all(c <= w * (1 + 1e-12) for c, w in zip(capped, weights, strict=True))
    if len(weights) * share > 1:
        assert max(capped) <= share * sum(capped) * (1 + 1e-9)
        # the order of the weights is kept (ties allowed)
        assert all(capped[i] <= capped[j] * (1 + 1e-12) for i in range(len(weights))
                   for j in range(len(weights)) if weights[i] <= weights[j])
