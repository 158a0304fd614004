"""Record-level differential privacy: DP-SGD inside a gateway's local training.

Theory of operation
-------------------
DP-SGD (Abadi et al. 2016) makes every optimizer step a Gaussian mechanism over the
*records* of the local data set: each example's gradient is clipped to L2 norm ``C`` (so one
record moves the summed batch gradient by at most ``C``), the clipped gradients are summed,
and Gaussian noise of std ``sigma * C`` is added to every coordinate of the sum. The sum is
divided by the *expected* batch size, a constant, so the divisor reveals nothing about which
records were drawn. Everything computed from the noised gradients afterwards (the optimizer
step, Adam moments, the model delta, the update pipeline) is post-processing.

Batches are drawn by **Poisson sampling**: at every step each of the ``n`` local records is
taken independently with probability ``q = batch_size / n``. This is exactly what the RDP
accountant's ``PoissonSampledDpEvent`` assumes, so the accounted epsilon is the epsilon of
what runs (batch sizes vary around ``batch_size``; a step may even see no record and then is
pure noise). The number of steps is a deterministic function of ``n`` and the
:class:`~fedcore.protocol.messages.TrainConfig` (:func:`dp_steps`): ``local_epochs`` notional
passes of ``ceil(n / batch_size)`` steps each, capped by ``max_steps``. The aggregator
recomputes it from the update's clear ``num_samples`` to charge the ledger; it reveals
nothing that ``num_samples`` does not.

Per-example gradients of the dense models come in closed form: for a layer ``h @ W + b``
with backpropagated error ``d`` (per example), the example's weight gradient is the outer
product ``h_i d_i^T`` and its bias gradient is ``d_i``. The norm of an outer product is the
product of the norms (Goodfellow 2015), so per-example gradient norms and the sum of clipped
gradients (``h^T (s * d)`` with per-example scale ``s_i = min(1, C / |g_i|)``) are computed
without materialising one gradient per example. :func:`per_example_grads` does materialise
them, for tests and for inspection.

Pure: no clocks, no global RNG; the caller's ``numpy.random.Generator`` draws samples and
noise. Gateways use this module; the accountant lives on the aggregator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.learning.models import (
    _as_input,
    _forward_cache,
    _loss_and_output_grad,
    check_params,
)
from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec, TrainConfig


def sampling_rate(num_samples: int, config: TrainConfig) -> float:
    """Poisson sampling probability per record per step: ``batch_size / n``, at most 1."""
    if num_samples < 1:
        raise ValueError("no training samples")
    return min(1.0, config.batch_size / num_samples)


def dp_steps(num_samples: int, config: TrainConfig) -> int:
    """Optimizer steps one DP-SGD round takes on ``num_samples`` records (deterministic)."""
    if num_samples < 1:
        raise ValueError("no training samples")
    steps = config.local_epochs * math.ceil(num_samples / config.batch_size)
    return min(steps, config.max_steps) if config.max_steps else steps


def check_dp_config(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the bad DP field of ``config``."""
    if not (math.isfinite(config.dp_clip) and config.dp_clip >= 0):
        raise ValueError(f"dp_clip must be >= 0, got {config.dp_clip}")
    if not (math.isfinite(config.dp_noise) and config.dp_noise >= 0):
        raise ValueError(f"dp_noise must be >= 0, got {config.dp_noise}")
    if config.dp_noise > 0 and config.dp_clip <= 0:
        raise ValueError("dp_noise needs dp_clip > 0 (the noise is scaled to the clip norm)")


def _per_example_errors(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray | None
) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    """Mean loss, each layer's input ``(n, n_in)`` and each layer's per-example error
    ``(n, n_out)``: the gradient of *that example's own* loss w.r.t. the layer's output."""
    out, inputs = _forward_cache(spec, params, x)
    loss, delta = _loss_and_output_grad(spec, out, x, y)
    # the batch loss is the mean of the examples' losses: undo the 1/n to get each one's own
    delta = delta * out.dtype.type(x.shape[0])
    errors: list[np.ndarray] = [np.empty(0)] * len(inputs)
    for i in range(len(inputs) - 1, -1, -1):
        errors[i] = delta
        if i > 0:
            h = inputs[i]
            delta = delta @ params[2 * i].T
            delta = delta * (h > 0) if spec.activation == "relu" else delta * (1 - h * h)
    return loss, inputs, errors


def per_example_grads(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray | None
) -> Params:
    """One gradient per example: a list like ``params`` with a leading axis of size n."""
    check_params(spec, params)
    xs = _as_input(spec, params, x)
    _, inputs, errors = _per_example_errors(spec, params, xs, y)
    grads: Params = []
    for h, d in zip(inputs, errors, strict=True):
        grads += [np.einsum("ni,nj->nij", h, d), d.copy()]
    return grads


@dataclass(frozen=True)
class ClippedSum:
    loss: float  # mean loss of the batch (clear: never leaves the gateway under DP)
    grads: Params  # sum over the examples of their clipped gradients
    norms: np.ndarray  # per-example gradient norms before clipping, float64


def clipped_grad_sum(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    clip_norm: float,
) -> ClippedSum:
    """Sum of the per-example gradients, each scaled down to L2 norm <= ``clip_norm``."""
    if not clip_norm > 0:
        raise ValueError("clip_norm must be > 0")
    check_params(spec, params)
    xs = _as_input(spec, params, x)
    if xs.shape[0] == 0:
        raise ValueError("cannot clip gradients of an empty batch")
    loss, inputs, errors = _per_example_errors(spec, params, xs, y)
    squared = np.zeros(xs.shape[0], dtype=np.float64)
    for h, d in zip(inputs, errors, strict=True):
        h2 = np.sum(np.square(h, dtype=np.float64), axis=1)
        d2 = np.sum(np.square(d, dtype=np.float64), axis=1)
        squared += h2 * d2 + d2  # |h d^T|_F^2 = |h|^2 |d|^2, plus the bias gradient d
    norms = np.sqrt(squared)
    # float32 rounding can leave a scaled gradient a hair above C: shave a relative 1e-6
    scale = np.minimum(1.0, clip_norm * (1.0 - 1e-6) / np.maximum(norms, 1e-300))
    dtype = params[0].dtype
    grads: Params = []
    for h, d in zip(inputs, errors, strict=True):
        scaled = d * scale.astype(dtype)[:, None]
        grads += [h.T @ scaled, scaled.sum(axis=0)]
    return ClippedSum(loss, grads, norms)


def noisy_gradient(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    clip_norm: float,
    noise_multiplier: float,
    expected_batch: float,
    rng: np.random.Generator,
) -> tuple[float, Params]:
    """One DP-SGD gradient: (sum of clipped per-example gradients + N(0, (zC)^2)) / B.

    ``B`` is the expected batch size (a constant, not the drawn one). An empty batch gives
    pure noise and a NaN loss.
    """
    if not expected_batch > 0:
        raise ValueError("expected_batch must be > 0")
    if np.asarray(x).shape[0] == 0:
        loss, total = float("nan"), [np.zeros_like(p) for p in params]
    else:
        result = clipped_grad_sum(spec, params, x, y, clip_norm)
        loss, total = result.loss, result.grads
    sigma = float(noise_multiplier) * float(clip_norm)
    out: Params = []
    for g in total:
        if sigma > 0:
            # drawn in float64 and rounded once, so the std is exact at float32 precision
            g = (g + rng.normal(0.0, sigma, g.shape)).astype(g.dtype)
        out.append(g / g.dtype.type(expected_batch))
    return loss, out
