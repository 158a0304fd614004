"""Gateway-side privacy: L2 clipping, Gaussian noise, adaptive quantile clipping."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedcore.privacy.adaptive import (
    INDICATOR_NOISE_RATIO,
    accounted_noise_multiplier,
    gateway_indicator,
    update_clip_norm,
    update_noise_multiplier,
)
from fedcore.privacy.clipping import add_gaussian_noise, clip_l2, l2_norm


def test_clipping_bounds_the_norm_and_keeps_the_direction() -> None:
    v = np.array([3.0, 4.0], dtype=np.float32)
    clipped, norm, was = clip_l2(v, 1.0)
    assert norm == pytest.approx(5.0) and was
    assert l2_norm(clipped) <= 1.0
    assert l2_norm(clipped) == pytest.approx(1.0, rel=1e-5)
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-5)
    small, norm, was = clip_l2(v, 10.0)
    assert not was and norm == pytest.approx(5.0) and np.array_equal(small, v)


def test_clipped_norm_never_exceeds_the_bound_in_float32() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        v = rng.normal(0, rng.uniform(0.1, 100), int(rng.integers(1, 3000))).astype(np.float32)
        c = float(rng.uniform(0.01, 5))
        assert l2_norm(clip_l2(v, c)[0]) <= c


def test_noise_has_the_requested_standard_deviation() -> None:
    rng = np.random.default_rng(7)
    v = np.zeros(200_000, dtype=np.float32)
    noisy = add_gaussian_noise(v, noise_multiplier=0.8, clip_norm=2.5, rng=rng)
    assert noisy.dtype == np.float32
    assert float(np.std(noisy)) == pytest.approx(2.0, rel=0.01)
    assert abs(float(np.mean(noisy))) < 0.02
    assert np.array_equal(add_gaussian_noise(v[:10], 0.0, 1.0, rng), v[:10])


def test_noise_is_reproducible_from_the_generator() -> None:
    v = np.ones(50, dtype=np.float32)
    a = add_gaussian_noise(v, 1.0, 1.0, np.random.default_rng(5))
    b = add_gaussian_noise(v, 1.0, 1.0, np.random.default_rng(5))
    assert np.array_equal(a, b)


def test_adaptive_clip_converges_to_the_target_quantile() -> None:
    rng = np.random.default_rng(11)
    clip = 0.01
    target = 0.5
    for _ in range(300):
        norms = rng.lognormal(mean=0.0, sigma=0.5, size=50)  # median 1.0
        indicators = [gateway_indicator(n, clip, 0.0, rng) for n in norms]
        clip = update_clip_norm(clip, indicators, target, learning_rate=0.2)
    assert clip == pytest.approx(1.0, rel=0.15)


def test_adaptive_clip_moves_the_right_way_and_is_pure() -> None:
    all_under = [0.5] * 10  # every update fitted: the clip norm is too large
    all_over = [-0.5] * 10
    assert update_clip_norm(1.0, all_under, 0.5) == pytest.approx(math.exp(-0.2 * 0.5))
    assert update_clip_norm(1.0, all_over, 0.5) == pytest.approx(math.exp(0.2 * 0.5))
    assert update_clip_norm(1.0, [], 0.5) == 1.0
    with pytest.raises(ValueError):
        update_clip_norm(1.0, all_over, 0.5, count_noise_std=1.0)  # noise needs an rng
    with pytest.raises(ValueError):
        update_clip_norm(1.0, all_over, 1.0)


def test_noisy_indicators_still_track_the_quantile_on_average() -> None:
    rng = np.random.default_rng(2)
    z = 1.0
    values = [gateway_indicator(0.5, 1.0, z, rng) for _ in range(20_000)]  # all unclipped
    assert float(np.mean(values)) == pytest.approx(0.5, abs=0.05)
    assert float(np.std(values)) == pytest.approx(INDICATOR_NOISE_RATIO * z, rel=0.03)


def test_accounted_noise_multiplier_round_trips_and_costs_a_little() -> None:
    z = 1.3
    eff = accounted_noise_multiplier(z, adaptive=True)
    assert 0.95 * z < eff < z
    assert update_noise_multiplier(eff, adaptive=True) == pytest.approx(z)
    assert accounted_noise_multiplier(z, adaptive=False) == z
    # joint Gaussian: z_eff^-2 = z^-2 + (2 sigma_b)^-2
    sigma_b = INDICATOR_NOISE_RATIO * z
    assert eff ** -2 == pytest.approx(z ** -2 + (2 * sigma_b) ** -2)
