"""Local training and evaluation: what a gateway does with the global model each round.

Theory of operation
-------------------
:func:`train_local` runs ``config.local_epochs`` passes of mini-batch training over the
gateway's data, each pass in a fresh order drawn from the caller's
``numpy.random.Generator`` (so a round is reproducible from its seed), stopping early once
``config.max_steps`` optimizer steps are done (``0`` = no cap: the cap bounds a round's
compute on a gateway with much data). The optimizer starts from a fresh state every call.
The caller's parameters are never modified; the new parameters are returned with a
:class:`TrainResult` whose ``loss`` is the sample-weighted mean mini-batch loss over the
last (possibly partial) epoch, each measured before that batch's step, and whose
``num_samples`` is the size of the local data set (the FedAvg weight).

With ``config.qat`` the forward pass runs through int8 fake-quant (per-channel weights,
per-tensor activations whose ranges are recalibrated at the start of each epoch) and the
gradients pass straight through (``fedcore.learning.quant``), so the int8 model the gateway
exports loses less to quantization.

With ``config.dp_clip > 0`` training is DP-SGD instead (record-level DP,
:mod:`fedcore.privacy.dpsgd`): Poisson-sampled batches (each record taken with probability
``batch_size / n`` at each step), :func:`~fedcore.privacy.dpsgd.dp_steps` steps, per-example
gradients clipped to ``dp_clip`` and Gaussian noise of std ``dp_noise * dp_clip`` on each
summed batch gradient. With both DP fields at 0 the original path runs unchanged, drawing
the same random numbers.

:func:`evaluate` scores a model on held-out data with the metrics that fit its task.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.learning import metrics, quant
from fedcore.learning.models import (
    anomaly_scores,
    check_params,
    check_spec,
    forward,
    loss_and_grads,
    predict,
)
from fedcore.learning.optim import make_optimizer
from fedcore.learning.params import Params
from fedcore.privacy.dpsgd import check_dp_config, dp_steps, noisy_gradient, sampling_rate
from fedcore.protocol.messages import ModelSpec, TrainConfig


@dataclass(frozen=True)
class TrainResult:
    loss: float  # mean training loss over the last epoch
    steps: int  # optimizer steps taken
    num_samples: int  # local training samples (the weight of this update)


def check_train_config(config: TrainConfig) -> None:
    """Raise ``ValueError`` naming the bad field of ``config``."""
    if config.local_epochs < 1:
        raise ValueError(f"local_epochs must be >= 1, got {config.local_epochs}")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {config.batch_size}")
    if not (config.learning_rate > 0 and np.isfinite(config.learning_rate)):
        raise ValueError(f"learning_rate must be > 0, got {config.learning_rate}")
    if config.max_steps < 0:
        raise ValueError(f"max_steps must be >= 0, got {config.max_steps}")
    make_optimizer(config.optimizer, config.learning_rate)
    check_dp_config(config)
    if config.qat and config.dp_clip > 0:
        raise ValueError("qat and record-level DP (dp_clip > 0) cannot be combined")


QAT_CALIBRATION_ROWS = 512


def train_local(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    config: TrainConfig,
    rng: np.random.Generator,
) -> tuple[Params, TrainResult]:
    """Train a copy of ``params`` on ``(x, y)``; ``y`` may be ``None`` for autoencoders."""
    check_spec(spec)
    check_params(spec, params)
    check_train_config(config)
    x = np.asarray(x, dtype=np.float32)
    n = int(x.shape[0]) if x.ndim == 2 else 0
    if n == 0:
        raise ValueError("no training samples")
    if y is not None:
        y = np.asarray(y)
        if y.shape[0] != n:
            raise ValueError(f"{n} samples but {y.shape[0]} targets")
        if spec.task != "classification":
            y = y.astype(np.float32, copy=False)
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    weights: Params = [np.asarray(p, dtype=np.float32) for p in params]
    if config.dp_clip > 0:
        return _train_dp(spec, weights, x, y, config, rng)
    state = optimizer.init(weights)
    steps = 0
    epoch_loss = float("nan")
    batch = min(config.batch_size, n)
    gradient = loss_and_grads
    for _ in range(config.local_epochs):
        order = rng.permutation(n)
        if config.qat:
            # int8 activation ranges of the current weights, fixed for the epoch (QAT)
            ranges = quant.calibrate_ranges(spec, weights, x[order[:QAT_CALIBRATION_ROWS]])
            gradient = functools.partial(quant.qat_loss_and_grads, ranges=ranges)
        total = 0.0
        seen = 0
        for start in range(0, n, batch):
            index = order[start : start + batch]
            loss, grads = gradient(spec, weights, x[index], None if y is None else y[index])
            weights, state = optimizer.step(weights, grads, state)
            total += loss * index.size
            seen += index.size
            steps += 1
            if config.max_steps and steps >= config.max_steps:
                break
        epoch_loss = total / seen
        if config.max_steps and steps >= config.max_steps:
            break
    return weights, TrainResult(loss=float(epoch_loss), steps=steps, num_samples=n)


def _train_dp(
    spec: ModelSpec,
    weights: Params,
    x: np.ndarray,
    y: np.ndarray | None,
    config: TrainConfig,
    rng: np.random.Generator,
) -> tuple[Params, TrainResult]:
    """DP-SGD with Poisson sampling; the step count is ``dp_steps`` (what is accounted)."""
    n = int(x.shape[0])
    optimizer = make_optimizer(config.optimizer, config.learning_rate)
    state = optimizer.init(weights)
    q = sampling_rate(n, config)
    total_steps = dp_steps(n, config)
    per_epoch = math.ceil(n / config.batch_size)
    expected = q * n
    total, seen = 0.0, 0
    for step in range(total_steps):
        index = np.flatnonzero(rng.random(n) < q) if q < 1.0 else np.arange(n)
        loss, grads = noisy_gradient(spec, weights, x[index], None if y is None else y[index],
                                     config.dp_clip, config.dp_noise, expected, rng)
        weights, state = optimizer.step(weights, grads, state)
        if step >= total_steps - per_epoch and index.size:
            total += loss * index.size  # the last notional epoch, as in the plain path
            seen += index.size
    epoch_loss = total / seen if seen else float("nan")
    return weights, TrainResult(loss=float(epoch_loss), steps=total_steps, num_samples=n)


def evaluate(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    *,
    target_scale: float = 1.0,
    anomaly_labels: np.ndarray | None = None,
) -> dict[str, float]:
    """Metrics of ``params`` on held-out ``(x, y)``.

    Classification: loss, accuracy, macro precision/recall/F1. Regression: loss (scaled)
    and MSE/RMSE/MAE multiplied back by ``target_scale`` (the target scaler's standard
    deviation, so errors are in the target's own unit). Autoencoder: loss (mean squared
    reconstruction error). With 0/1 ``anomaly_labels`` per row, also ``roc_auc`` of the
    anomaly scores (for a regression model: the absolute residual).
    """
    check_params(spec, params)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError("no evaluation samples")
    loss, _ = loss_and_grads(spec, params, x, y)
    out: dict[str, float] = {"loss": loss}
    if spec.kind == "autoencoder":
        out["mse"] = loss
    elif spec.task == "classification":
        assert y is not None  # loss_and_grads has already refused a missing y
        out.update(metrics.classification_report(np.asarray(y), predict(spec, params, x)))
    else:
        assert y is not None
        pred = forward(spec, params, x)
        truth = np.asarray(y, dtype=np.float32).reshape(pred.shape)
        report = metrics.regression_report(truth * target_scale, pred * target_scale)
        out.update(report)
    if anomaly_labels is not None:
        scores = anomaly_scores(spec, params, x, y)
        out["roc_auc"] = metrics.roc_auc(np.asarray(anomaly_labels), scores)
    return out
