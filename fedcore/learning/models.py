"""Dense numpy models: an MLP (regression or classification) and an autoencoder.

Theory of operation
-------------------
A model is a :class:`~fedcore.protocol.messages.ModelSpec` (the architecture, which travels
with the global model) plus its :data:`~fedcore.learning.params.Params`
``[W0, b0, W1, b1, ...]``. Layer ``i`` computes ``h @ Wi + bi``; hidden layers apply
``spec.activation`` (``relu`` or ``tanh``); the last layer is linear. What the output means
depends on the spec:

- ``kind="mlp", task="regression"``: the outputs are the predicted values; loss is MSE.
- ``kind="mlp", task="classification"``: the outputs are logits; loss is softmax
  cross-entropy against integer class ids; :func:`predict` returns the arg-max class.
- ``kind="autoencoder"`` (any task, normally ``"anomaly"``): ``n_out == n_in``, the output
  reconstructs the input; loss is the MSE of the reconstruction and the anomaly score is
  the per-sample mean squared reconstruction error.

Everything is batched matrix algebra, no per-sample Python loops. The arithmetic runs in the
dtype of the parameters: float32 in training and inference (what gateways run), float64 only
when a test feeds float64 parameters to check gradients against finite differences.
Functions are pure: randomness comes in as a ``numpy.random.Generator``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec

KINDS = ("mlp", "autoencoder")
TASKS = ("regression", "classification", "anomaly")
ACTIVATIONS = ("relu", "tanh")


def check_spec(spec: ModelSpec) -> None:
    """Raise ``ValueError`` naming what is wrong with ``spec``.

    Callers that got the spec from a peer wrap this into a ``RemoteProtocolError``.
    """
    if spec.kind not in KINDS:
        raise ValueError(f"model kind {spec.kind!r} is not one of {', '.join(KINDS)}")
    if spec.task not in TASKS:
        raise ValueError(f"model task {spec.task!r} is not one of {', '.join(TASKS)}")
    if spec.activation not in ACTIVATIONS:
        raise ValueError(
            f"activation {spec.activation!r} is not one of {', '.join(ACTIVATIONS)}"
        )
    sizes = spec.layer_sizes
    if len(sizes) < 2 or any(int(s) < 1 for s in sizes):
        raise ValueError(f"layer_sizes {tuple(sizes)} needs >= 2 positive sizes")
    if spec.kind == "autoencoder" and sizes[0] != sizes[-1]:
        raise ValueError(f"an autoencoder needs n_out == n_in, got layer_sizes {tuple(sizes)}")
    if spec.kind == "mlp" and spec.task == "classification" and sizes[-1] < 2:
        raise ValueError("a classifier needs >= 2 outputs (one logit per class)")


def check_params(spec: ModelSpec, params: Sequence[np.ndarray]) -> None:
    """Raise ``ValueError`` if ``params`` do not have the shapes ``spec`` implies."""
    expected = param_shapes(spec)
    got = tuple(tuple(int(d) for d in p.shape) for p in params)
    if got != expected:
        raise ValueError(f"params have shapes {got}, spec {spec.layer_sizes} needs {expected}")


def param_shapes(spec: ModelSpec) -> tuple[tuple[int, ...], ...]:
    sizes = [int(s) for s in spec.layer_sizes]
    shapes: list[tuple[int, ...]] = []
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        shapes += [(n_in, n_out), (n_out,)]
    return tuple(shapes)


def init_params(spec: ModelSpec, rng: np.random.Generator) -> Params:
    """Fresh float32 parameters: He-normal weights before ReLU, Glorot-uniform otherwise.

    The output layer uses Glorot (no activation follows it); biases start at zero.
    """
    check_spec(spec)
    sizes = [int(s) for s in spec.layer_sizes]
    params: Params = []
    last = len(sizes) - 2
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        if spec.activation == "relu" and i < last:
            w = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_in, n_out))
        else:
            limit = np.sqrt(6.0 / (n_in + n_out))
            w = rng.uniform(-limit, limit, size=(n_in, n_out))
        params += [w.astype(np.float32), np.zeros(n_out, dtype=np.float32)]
    return params


def _as_input(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[1] != int(spec.layer_sizes[0]):
        raise ValueError(f"input shape {x.shape} does not match n_in={spec.layer_sizes[0]}")
    return x.astype(params[0].dtype, copy=False)


def _activate(spec: ModelSpec, z: np.ndarray) -> np.ndarray:
    return np.maximum(z, 0) if spec.activation == "relu" else np.tanh(z)


def _forward_cache(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray
) -> tuple[np.ndarray, list[np.ndarray]]:
    """Output and the input of every layer (for backpropagation)."""
    inputs: list[np.ndarray] = []
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        inputs.append(h)
        z = h @ params[2 * i] + params[2 * i + 1]
        h = _activate(spec, z) if i < n_layers - 1 else z
    return h, inputs


def forward(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Raw outputs ``(n, n_out)``: values, logits or reconstructions (see module doc)."""
    check_params(spec, params)
    out, _ = _forward_cache(spec, params, _as_input(spec, params, x))
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def softmax(logits: np.ndarray) -> np.ndarray:
    return np.exp(_log_softmax(logits))


def _regression_target(y: np.ndarray, out: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 1:
        y = y[:, None]
    if y.shape != out.shape:
        raise ValueError(f"target shape {y.shape} does not match model output {out.shape}")
    return y.astype(out.dtype, copy=False)


def _class_ids(y: np.ndarray, n: int, n_classes: int) -> np.ndarray:
    ids = np.asarray(y).reshape(-1)
    if ids.shape[0] != n:
        raise ValueError(f"{ids.shape[0]} labels for {n} samples")
    ids_int = ids.astype(np.int64)
    if not np.array_equal(ids_int, ids) or ids_int.min() < 0 or ids_int.max() >= n_classes:
        raise ValueError(f"class labels must be integers in [0, {n_classes})")
    return ids_int


def _loss_and_output_grad(
    spec: ModelSpec, out: np.ndarray, x: np.ndarray, y: np.ndarray | None
) -> tuple[float, np.ndarray]:
    n = out.shape[0]
    if spec.kind == "autoencoder":
        diff = out - x
    elif spec.task == "classification":
        if y is None:
            raise ValueError("a classifier needs labels")
        ids = _class_ids(y, n, out.shape[1])
        logp = _log_softmax(out)
        loss = -float(np.mean(logp[np.arange(n), ids], dtype=np.float64))
        grad = np.exp(logp)
        grad[np.arange(n), ids] -= 1
        return loss, grad / out.dtype.type(n)
    else:
        if y is None:
            raise ValueError("a regression model needs targets")
        diff = out - _regression_target(y, out)
    loss = float(np.mean(np.square(diff), dtype=np.float64))
    return loss, diff * out.dtype.type(2.0 / diff.size)


def loss_and_grads(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray | None
) -> tuple[float, Params]:
    """Mean loss over the batch and its gradient for every parameter.

    ``y`` is ignored by autoencoders (the target is ``x``); integer class ids for
    classifiers; values ``(n,)`` or ``(n, n_out)`` for regression.
    """
    check_params(spec, params)
    xs = _as_input(spec, params, x)
    if xs.shape[0] == 0:
        raise ValueError("cannot compute a loss on an empty batch")
    out, inputs = _forward_cache(spec, params, xs)
    loss, delta = _loss_and_output_grad(spec, out, xs, y)
    grads: Params = [np.empty(0)] * len(params)
    for i in range(len(params) // 2 - 1, -1, -1):
        h = inputs[i]
        grads[2 * i] = h.T @ delta
        grads[2 * i + 1] = delta.sum(axis=0)
        if i > 0:
            delta = delta @ params[2 * i].T
            # h is the activated output of layer i-1; both derivatives are cheap from it.
            delta = delta * (h > 0) if spec.activation == "relu" else delta * (1 - h * h)
    return loss, grads


def predict(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """Regression: values, ``(n,)`` for one output; classification: class ids ``(n,)``;
    autoencoder: the reconstruction ``(n, n_in)``."""
    out = forward(spec, params, x)
    if spec.kind == "autoencoder":
        return out
    if spec.task == "classification":
        return np.argmax(out, axis=1)
    return out[:, 0] if out.shape[1] == 1 else out


def anomaly_scores(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, y: np.ndarray | None = None
) -> np.ndarray:
    """One score per sample, higher = more anomalous.

    Autoencoder: mean squared reconstruction error. Regression (a normal-behaviour model):
    mean absolute residual against the measured ``y`` (required). Classification: one minus
    the top softmax probability (the model's uncertainty).
    """
    out = forward(spec, params, x)
    if spec.kind == "autoencoder":
        xs = _as_input(spec, params, x)
        return np.asarray(np.mean(np.square(out - xs), axis=1))
    if spec.task == "classification":
        return np.asarray(1.0 - softmax(out).max(axis=1))
    if y is None:
        raise ValueError("anomaly scores of a regression model need the measured targets")
    return np.asarray(np.mean(np.abs(out - _regression_target(y, out)), axis=1))


def fold_scaler(spec: ModelSpec, params: Sequence[np.ndarray]) -> tuple[ModelSpec, Params]:
    """The same function on raw inputs and outputs: the fleet scaler in ``spec`` folded into
    the first layer (``(x - mean) / std``) and, for regression and autoencoders, the last
    (``y * std + mean``). Returns a spec without scaler and the folded float32 weights.
    A spec without scaler is returned unchanged (its rows were scaled elsewhere)."""
    import msgspec

    weights = [np.asarray(p, np.float64).copy() for p in params]
    if not spec.has_scaler:
        return spec, [w.astype(np.float32) for w in weights]
    mean = np.asarray(spec.feature_mean, np.float64)
    std = np.asarray(spec.feature_std, np.float64)
    w0, b0 = weights[0], weights[1]
    weights[1] = b0 - (mean / std) @ w0
    weights[0] = w0 / std[:, None]
    if spec.kind == "autoencoder":
        weights[-2] = weights[-2] * std[None, :]
        weights[-1] = weights[-1] * std + mean
    elif spec.task == "regression":
        weights[-2] = weights[-2] * spec.target_std
        weights[-1] = weights[-1] * spec.target_std + spec.target_mean
    plain = msgspec.structs.replace(spec, feature_mean=(), feature_std=(), target_mean=0.0,
                                    target_std=1.0)
    return plain, [w.astype(np.float32) for w in weights]
