"""Models: shapes, initialisation, gradients against finite differences, predictions."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.learning.models import (
    anomaly_scores,
    check_spec,
    forward,
    init_params,
    loss_and_grads,
    predict,
)
from fedcore.learning.params import shapes_of
from fedcore.protocol.messages import ModelSpec

REG = ModelSpec(kind="mlp", layer_sizes=(5, 8, 6, 1), activation="tanh", task="regression")
REG2 = ModelSpec(kind="mlp", layer_sizes=(5, 7, 3), activation="relu", task="regression")
CLS = ModelSpec(kind="mlp", layer_sizes=(5, 9, 4), activation="relu", task="classification")
AE = ModelSpec(kind="autoencoder", layer_sizes=(6, 3, 6), activation="tanh", task="anomaly")


def _numeric_grads(spec, params, x, y, eps=1e-6):
    grads = []
    for p in params:
        g = np.zeros_like(p)
        flat = p.reshape(-1)
        gflat = g.reshape(-1)
        for i in range(flat.size):
            old = flat[i]
            flat[i] = old + eps
            up, _ = loss_and_grads(spec, params, x, y)
            flat[i] = old - eps
            down, _ = loss_and_grads(spec, params, x, y)
            flat[i] = old
            gflat[i] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


@pytest.mark.parametrize("spec", [REG, REG2, CLS, AE], ids=["reg-tanh", "reg-multi", "cls", "ae"])
def test_gradients_match_finite_differences(spec):
    rng = np.random.default_rng(1)
    params = [p.astype(np.float64) for p in init_params(spec, rng)]
    # Non-zero biases so their gradients are exercised off the symmetric start.
    params = [p + 0.1 * rng.standard_normal(p.shape) for p in params]
    x = rng.standard_normal((7, spec.layer_sizes[0]))
    n_out = spec.layer_sizes[-1]
    if spec.task == "classification":
        y = rng.integers(0, n_out, size=7)
    elif n_out == 1:
        y = rng.standard_normal(7)
    else:
        y = rng.standard_normal((7, n_out))
    _, analytic = loss_and_grads(spec, params, x, None if spec.kind == "autoencoder" else y)
    numeric = _numeric_grads(spec, params, x, None if spec.kind == "autoencoder" else y)
    for a, b in zip(analytic, numeric, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_init_is_float32_with_architecture_shapes_and_deterministic():
    p1 = init_params(CLS, np.random.default_rng(3))
    p2 = init_params(CLS, np.random.default_rng(3))
    assert shapes_of(p1) == ((5, 9), (9,), (9, 4), (4,))
    assert all(p.dtype == np.float32 for p in p1)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2, strict=True))
    assert not np.any(p1[1]) and np.std(p1[0]) > 0
    # He init: std of the first (ReLU) layer is about sqrt(2 / fan_in).
    big = ModelSpec(kind="mlp", layer_sizes=(200, 300, 2), task="classification")
    w = init_params(big, np.random.default_rng(0))[0]
    assert abs(float(np.std(w)) - np.sqrt(2 / 200)) < 0.005


def test_forward_and_predict_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((11, 5)).astype(np.float32)
    for spec, out_shape, pred_shape in [
        (REG, (11, 1), (11,)),
        (REG2, (11, 3), (11, 3)),
        (CLS, (11, 4), (11,)),
    ]:
        params = init_params(spec, rng)
        out = forward(spec, params, x)
        assert out.shape == out_shape and out.dtype == np.float32
        assert predict(spec, params, x).shape == pred_shape
    params = init_params(CLS, rng)
    labels = predict(CLS, params, x)
    assert np.array_equal(labels, np.argmax(forward(CLS, params, x), axis=1))


def test_forward_matches_a_hand_computation():
    spec = ModelSpec(kind="mlp", layer_sizes=(2, 2, 1), activation="relu")
    params = [
        np.array([[1.0, -1.0], [2.0, 0.5]], np.float32),
        np.array([0.0, -1.0], np.float32),
        np.array([[3.0], [4.0]], np.float32),
        np.array([0.5], np.float32),
    ]
    x = np.array([[1.0, 1.0], [-1.0, 0.0]], np.float32)
    # row 0: hidden = relu([3, -1.5]) = [3, 0] -> 9.5; row 1: relu([-1, 0]) = 0 -> 0.5
    np.testing.assert_allclose(predict(spec, params, x), [9.5, 0.5])


def test_anomaly_scores():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 6)).astype(np.float32)
    params = init_params(AE, rng)
    recon = forward(AE, params, x)
    np.testing.assert_allclose(
        anomaly_scores(AE, params, x), np.mean((recon - x) ** 2, axis=1), rtol=1e-6
    )
    reg_params = init_params(REG, rng)
    xr = rng.standard_normal((4, 5)).astype(np.float32)
    y = predict(REG, reg_params, xr) + np.array([0, 1, -2, 0], np.float32)
    np.testing.assert_allclose(anomaly_scores(REG, reg_params, xr, y), [0, 1, 2, 0], atol=1e-5)
    with pytest.raises(ValueError, match="measured targets"):
        anomaly_scores(REG, reg_params, xr)


def test_bad_specs_inputs_and_labels_are_refused():
    for spec, match in [
        (ModelSpec(kind="cnn", layer_sizes=(2, 1)), "kind"),
        (ModelSpec(kind="mlp", layer_sizes=(2,)), "layer_sizes"),
        (ModelSpec(kind="mlp", layer_sizes=(2, 1), activation="gelu"), "activation"),
        (ModelSpec(kind="autoencoder", layer_sizes=(4, 2, 3)), "n_out == n_in"),
        (ModelSpec(kind="mlp", layer_sizes=(2, 1), task="classification"), ">= 2 outputs"),
    ]:
        with pytest.raises(ValueError, match=match):
            check_spec(spec)
    params = init_params(CLS, np.random.default_rng(0))
    with pytest.raises(ValueError, match="n_in"):
        forward(CLS, params, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="shapes"):
        forward(CLS, params[:2], np.zeros((3, 5), np.float32))
    with pytest.raises(ValueError, match="integers in"):
        loss_and_grads(CLS, params, np.zeros((2, 5), np.float32), np.array([0, 4]))


def test_cross_entropy_of_uniform_logits_is_log_k():
    params = [np.zeros_like(p) for p in init_params(CLS, np.random.default_rng(0))]
    loss, _ = loss_and_grads(CLS, params, np.ones((3, 5), np.float32), np.array([0, 1, 3]))
    assert loss == pytest.approx(np.log(4), rel=1e-6)
