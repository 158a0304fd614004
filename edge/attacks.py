"""Malicious gateways, for attack experiments only: turn an honest update into a bad one.

Theory of operation
-------------------
A gateway's update is its delta ``trained - global``. Each attack here is a pure function
on that delta, or (label flipping) on the training data before local training:

- ``sign_flip``: send ``-factor * delta``: pushes the model uphill.
- ``scale``: send ``factor * delta`` (x10 by default): one loud gateway dominates a mean.
- ``gaussian_noise``: add ``N(0, std^2)`` to every coordinate (absolute, not relative to
  the update, as in the Byzantine literature's Gaussian attack).
- ``label_flip``: poison the data instead. Classification: class ``c`` becomes
  ``C - 1 - c``. Regression: the target is negated; targets are standardised (mean 0), so
  this mirrors every value around the mean: the model learns the inverse relation.
- ``little_is_enough`` (Baruch et al., NeurIPS 2019): colluding gateways send
  ``mu - z * sigma * sign(mu)`` per coordinate, where ``mu``, ``sigma`` are the benign
  updates' mean and standard deviation. Each coordinate stays within ``z`` standard
  deviations of the honest crowd, so median, trimmed mean and Krum accept it, yet every
  coordinate is biased against the direction of progress. The paper's
  ``z_max = PhiInverse((n - s) / n)`` with ``s = floor(n / 2 + 1) - m`` is the largest
  shift for which the ``m`` attackers still look more central than enough honest ones.
  ``sign(mu)`` picks the harmful side per coordinate (the paper leaves the sign open).
  :func:`little_is_enough` is the collusion variant benchmarks use (it sees the round's
  benign updates). A lone gateway only has its own update, so the variant behind
  :func:`make_attack` takes its own delta as ``mu`` and ``spread`` times its RMS as every
  coordinate's ``sigma``: cruder, but needs nothing a real gateway does not have.

:func:`make_attack` returns an object with ``poison_data`` and ``poison_weights``, the
shape the gateway runtime's ``Attack`` protocol expects. Randomness comes in as a
``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from fedcore.learning.params import Params, add, subtract
from fedcore.protocol.messages import ModelSpec

# ---- pure transforms on a delta -----------------------------------------------------------


def sign_flip(delta: Sequence[np.ndarray], factor: float = 1.0) -> Params:
    return [(-factor * np.asarray(d, np.float32)).astype(np.float32) for d in delta]


def scale(delta: Sequence[np.ndarray], factor: float = 10.0) -> Params:
    return [(factor * np.asarray(d, np.float32)).astype(np.float32) for d in delta]


def gaussian_noise(delta: Sequence[np.ndarray], rng: np.random.Generator, std: float = 1.0) -> Params:
    return [
        (np.asarray(d, np.float32) + std * rng.standard_normal(np.shape(d))).astype(np.float32)
        for d in delta
    ]


def flip_labels(spec: ModelSpec, y: np.ndarray) -> np.ndarray:
    """The poisoned targets: mirrored classes, or negated standardised regression targets."""
    if spec.kind == "autoencoder" or spec.task == "anomaly":
        raise ValueError("label flipping needs a target; an autoencoder has none")
    if spec.task == "classification":
        classes = int(spec.layer_sizes[-1])
        return (classes - 1 - np.asarray(y)).astype(np.asarray(y).dtype)
    return (-np.asarray(y, np.float32)).astype(np.float32)


def alie_z(num_clients: int, num_malicious: int) -> float:
    """Baruch et al.'s ``z_max`` for ``num_malicious`` of ``num_clients`` gateways."""
    if not 0 < num_malicious < num_clients:
        raise ValueError(f"need 0 < num_malicious < num_clients, got {num_malicious}, {num_clients}")
    supporters = num_clients // 2 + 1 - num_malicious
    quantile = (num_clients - supporters) / num_clients
    # too many attackers for the formula (quantile 1): any shift looks central; cap it
    return float(NormalDist().inv_cdf(min(quantile, 0.999)))


def little_is_enough(benign: Sequence[Params], z: float) -> Params:
    """The colluders' shared update from the round's benign updates (collusion variant)."""
    if len(benign) < 2:
        raise ValueError("little_is_enough needs at least 2 benign updates to estimate a spread")
    out: Params = []
    for layer in range(len(benign[0])):
        stack = np.stack([np.asarray(u[layer], np.float64) for u in benign])
        mu, sigma = stack.mean(axis=0), stack.std(axis=0)
        out.append((mu - z * sigma * np.sign(mu)).astype(np.float32))
    return out


def little_is_enough_local(delta: Sequence[np.ndarray], z: float = 1.0, spread: float = 1.0) -> Params:
    """Gateway-only approximation: ``mu`` = own delta, ``sigma`` = ``spread`` x its RMS."""
    flat = np.concatenate([np.asarray(d, np.float64).ravel() for d in delta]) if delta else np.zeros(0)
    rms = float(np.sqrt(np.mean(np.square(flat)))) if flat.size else 0.0
    return [
        (np.asarray(d, np.float64) - z * spread * rms * np.sign(d)).astype(np.float32)
        for d in delta
    ]


# ---- attacks as gateway behaviour ---------------------------------------------------------


@dataclass(frozen=True)
class DeltaAttack:
    """Trains honestly, then replaces its delta with ``transform(delta)``."""

    name: str
    transform: Callable[[Params], Params]

    def poison_data(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, y

    def poison_weights(self, base: list[np.ndarray], trained: list[np.ndarray]) -> list[np.ndarray]:
        return add(base, self.transform(subtract(trained, base)))


@dataclass(frozen=True)
class LabelFlip:
    """Trains on poisoned targets and sends the result as an ordinary update."""

    name: str = "label_flip"

    def poison_data(self, spec: ModelSpec, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return x, flip_labels(spec, y)

    def poison_weights(self, base: list[np.ndarray], trained: list[np.ndarray]) -> list[np.ndarray]:
        return trained


Attack = DeltaAttack | LabelFlip

# name -> {parameter: default}
ATTACKS: dict[str, dict[str, float]] = {
    "sign_flip": {"factor": 1.0},
    "scale": {"factor": 10.0},
    "gaussian_noise": {"std": 1.0},
    "label_flip": {},
    "little_is_enough": {"z": 1.0, "spread": 1.0},
}


def make_attack(name: str, rng: np.random.Generator, **params: Any) -> Attack:
    """The named attack; ``ValueError`` naming an unknown attack or parameter."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; known: {', '.join(sorted(ATTACKS))}")
    unknown = sorted(set(params) - set(ATTACKS[name]))
    if unknown:
        raise ValueError(f"attack {name!r}: unknown parameter {unknown[0]!r}")
    p = {**ATTACKS[name], **params}
    for key, value in p.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value):
            raise ValueError(f"attack {name!r}: parameter {key!r} = {value!r} is not a number")
    if name == "sign_flip":
        return DeltaAttack(name, lambda d: sign_flip(d, p["factor"]))
    if name == "scale":
        return DeltaAttack(name, lambda d: scale(d, p["factor"]))
    if name == "gaussian_noise":
        if p["std"] < 0:
            raise ValueError(f"attack {name!r}: parameter 'std' = {p['std']!r} must be >= 0")
        return DeltaAttack(name, lambda d: gaussian_noise(d, rng, p["std"]))
    if name == "label_flip":
        return LabelFlip()
    return DeltaAttack(name, lambda d: little_is_enough_local(d, p["z"], p["spread"]))
