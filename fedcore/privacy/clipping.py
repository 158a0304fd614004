"""L2 clipping and Gaussian noise: the two halves of the Gaussian mechanism on an update.

Clipping bounds what one gateway's data can change in what it sends (the *sensitivity*):
after ``clip_l2(v, C)`` every update has L2 norm <= C. Gaussian noise with standard
deviation ``sigma = noise_multiplier * C`` on every coordinate then makes the update
(epsilon, delta)-differentially private; the accountant (aggregator side,
``aggregator/privacy.py``) turns ``noise_multiplier`` and the number of releases into
epsilon. Both functions are pure; the random numbers come from the caller's Generator.
"""

from __future__ import annotations

import numpy as np


def l2_norm(vector: np.ndarray) -> float:
    return float(np.sqrt(np.sum(np.square(vector, dtype=np.float64))))


def clip_l2(vector: np.ndarray, clip_norm: float) -> tuple[np.ndarray, float, bool]:
    """Scale ``vector`` down to L2 norm ``clip_norm`` if larger.

    Returns (clipped float32 vector, norm before clipping, whether it was scaled down).
    """
    if clip_norm <= 0:
        raise ValueError("clip_norm must be > 0")
    v = np.asarray(vector, dtype=np.float32)
    norm = l2_norm(v)
    if norm <= clip_norm:
        return v.copy(), norm, False
    # float32 rounding can leave the result a hair above clip_norm; shave a relative 1e-6
    factor = np.float32(clip_norm / norm * (1.0 - 1e-6))
    return v * factor, norm, True


def add_gaussian_noise(
    vector: np.ndarray, noise_multiplier: float, clip_norm: float, rng: np.random.Generator
) -> np.ndarray:
    """``vector + N(0, (noise_multiplier * clip_norm)^2)`` on every coordinate, float32."""
    sigma = float(noise_multiplier) * float(clip_norm)
    v = np.asarray(vector, dtype=np.float32)
    if sigma <= 0:
        return v.copy()
    # drawn in float64 and rounded once, so the noise has the requested std at float32 precision
    return (v + rng.normal(0.0, sigma, v.size).reshape(v.shape)).astype(np.float32)
