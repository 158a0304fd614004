"""Adaptive quantile clipping (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021).

A fixed clip norm is hard to pick: too small and every update is shrunk (bias), too large
and the noise, which scales with it, drowns the signal. Adaptive clipping moves the clip
norm ``C`` toward a target quantile ``gamma`` of the gateways' update norms, geometrically::

    b_i   = 1 if ||delta_i|| <= C else 0            (gateway i's "unclipped" indicator)
    b_bar = mean of the (noisy) indicators
    C'    = C * exp(-eta * (b_bar - gamma))

If more than a fraction ``gamma`` of the updates fit under ``C``, ``C`` shrinks; otherwise it
grows. ``update_clip_norm`` is the aggregator's pure step; the aggregator announces the new
``C`` in the next round's PipelineConfig.

Privacy of the indicator. With DP on, the indicator is itself a release about the gateway's
data, so it is noised on the gateway (local model: the aggregator must not see the clear
bit). Following the paper, the gateway sends the centred indicator ``b - 1/2`` plus Gaussian
noise of std ``sigma_b``; its sensitivity is 1/2. Sent together with the update (sensitivity
C, noise z*C) the pair is one Gaussian mechanism with effective noise multiplier

    z_eff = (z^-2 + (2 * sigma_b)^-2)^(-1/2)

which is what the accountant must be charged (:func:`accounted_noise_multiplier`). fedgate
fixes ``sigma_b = INDICATOR_NOISE_RATIO * z``, so the indicator costs a fixed ~3% of the
noise: :func:`update_noise_multiplier` inverts the relation for calibration.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

INDICATOR_NOISE_RATIO = 2.0  # sigma_b = ratio * z;  z_eff = z / sqrt(1 + 1/(4 ratio^2))
DEFAULT_CLIP_LEARNING_RATE = 0.2  # eta of the paper
MIN_CLIP_NORM = 1e-6
MAX_CLIP_NORM = 1e6


def indicator_noise_std(noise_multiplier: float) -> float:
    return INDICATOR_NOISE_RATIO * noise_multiplier


def accounted_noise_multiplier(noise_multiplier: float, adaptive: bool) -> float:
    """The noise multiplier the accountant is charged for one round of this gateway."""
    if not adaptive or noise_multiplier <= 0:
        return noise_multiplier
    return noise_multiplier / math.sqrt(1.0 + 1.0 / (4.0 * INDICATOR_NOISE_RATIO**2))


def update_noise_multiplier(accounted: float, adaptive: bool) -> float:
    """Inverse of :func:`accounted_noise_multiplier`: what to announce for a calibrated z."""
    if not adaptive or accounted <= 0:
        return accounted
    return accounted * math.sqrt(1.0 + 1.0 / (4.0 * INDICATOR_NOISE_RATIO**2))


def gateway_indicator(
    pre_clip_norm: float, clip_norm: float, noise_multiplier: float, rng: np.random.Generator
) -> float:
    """The centred, noised "unclipped" indicator a gateway reports: (b - 1/2) + N(0, sigma_b^2)."""
    centred = (1.0 if pre_clip_norm <= clip_norm else 0.0) - 0.5
    sigma_b = indicator_noise_std(noise_multiplier)
    return centred + (float(rng.normal(0.0, sigma_b)) if sigma_b > 0 else 0.0)


def update_clip_norm(
    clip_norm: float,
    indicators: Sequence[float],
    target_quantile: float,
    learning_rate: float = DEFAULT_CLIP_LEARNING_RATE,
    count_noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> float:
    """One geometric step of the clip norm from this round's centred indicators.

    ``indicators`` are the gateways' :func:`gateway_indicator` values (already noisy under
    DP). ``count_noise_std`` adds the paper's central noise to the *sum* (for deployments
    where gateways send clear indicators and only the clip norm is published); it needs
    ``rng``. With no indicators the clip norm stays as it is.
    """
    if not 0.0 < target_quantile < 1.0:
        raise ValueError("target_quantile must be in (0, 1)")
    if not indicators:
        return clip_norm
    total = float(np.sum(np.asarray(indicators, dtype=np.float64)))
    if count_noise_std > 0:
        if rng is None:
            raise ValueError("count_noise_std > 0 needs an rng")
        total += float(rng.normal(0.0, count_noise_std))
    unclipped_fraction = total / len(indicators) + 0.5
    new = clip_norm * math.exp(-learning_rate * (unclipped_fraction - target_quantile))
    return min(MAX_CLIP_NORM, max(MIN_CLIP_NORM, new))
