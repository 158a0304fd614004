"""Optimizers and local training: convergence, determinism, caps, no mutation."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.learning.models import init_params, loss_and_grads, predict
from fedcore.learning.optim import SGD, Adam, make_optimizer
from fedcore.learning.training import check_train_config, evaluate, train_local
from fedcore.protocol.messages import ModelSpec, TrainConfig

REG = ModelSpec(kind="mlp", layer_sizes=(3, 16, 1), activation="tanh", task="regression")
CLS = ModelSpec(kind="mlp", layer_sizes=(2, 16, 3), activation="relu", task="classification")


def _regression_data(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, (n, 3)).astype(np.float32)
    y = (np.sin(2 * x[:, 0]) + x[:, 1] * x[:, 2]).astype(np.float32)
    return x, y


def _blobs(n=300, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.array([[0, 3], [3, -2], [-3, -2]], np.float32)
    y = rng.integers(0, 3, n)
    return (centers[y] + rng.standard_normal((n, 2))).astype(np.float32), y


def test_sgd_step_by_hand_and_momentum():
    p = [np.array([1.0, 2.0], np.float32)]
    g = [np.array([0.5, -1.0], np.float32)]
    sgd = SGD(0.1)
    new, state = sgd.step(p, g, sgd.init(p))
    np.testing.assert_allclose(new[0], [0.95, 2.1])
    assert state.steps == 1 and p[0][0] == 1.0  # input untouched
    heavy = SGD(0.1, momentum=0.9)
    s = heavy.init(p)
    p1, s = heavy.step(p, g, s)
    p2, s = heavy.step(p1, g, s)
    # v1 = g, v2 = 0.9 g + g = 1.9 g; total move = 0.1 * 2.9 g
    np.testing.assert_allclose(p2[0], p[0] - 0.29 * g[0], rtol=1e-6)


def test_adam_first_step_moves_by_learning_rate_per_coordinate():
    p = [np.array([1.0, -1.0, 0.0], np.float32)]
    g = [np.array([3.0, -0.01, 1e-3], np.float32)]
    adam = Adam(0.01)
    new, state = adam.step(p, g, adam.init(p))
    # Bias-corrected first step is lr * sign(g) (for |g| >> eps).
    np.testing.assert_allclose(new[0], [0.99, -0.99, -0.01], rtol=1e-4)
    assert new[0].dtype == np.float32 and state.steps == 1
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("lbfgs", 0.1)


@pytest.mark.parametrize("optimizer,lr", [("sgd", 0.1), ("adam", 0.01)])
def test_regression_training_lowers_loss(optimizer, lr):
    x, y = _regression_data()
    params = init_params(REG, np.random.default_rng(0))
    before, _ = loss_and_grads(REG, params, x, y)
    config = TrainConfig(local_epochs=30, batch_size=32, learning_rate=lr, optimizer=optimizer)
    new, result = train_local(REG, params, x, y, config, np.random.default_rng(1))
    after, _ = loss_and_grads(REG, new, x, y)
    assert after < 0.25 * before
    assert result.steps == 30 * 13 and result.num_samples == 400
    assert abs(result.loss - after) < 0.5 * before  # last-epoch mean is near the final loss
    assert all(p.dtype == np.float32 for p in new)


def test_classifier_learns_blobs_and_evaluate_reports_metrics():
    x, y = _blobs()
    params = init_params(CLS, np.random.default_rng(0))
    config = TrainConfig(local_epochs=10, batch_size=16, learning_rate=0.01, optimizer="adam")
    new, _ = train_local(CLS, params, x, y, config, np.random.default_rng(0))
    xt, yt = _blobs(seed=1)
    report = evaluate(CLS, new, xt, yt)
    assert report["accuracy"] > 0.9
    assert set(report) == {"loss", "accuracy", "precision", "recall", "f1"}
    assert evaluate(CLS, params, xt, yt)["loss"] > report["loss"]


def test_training_is_deterministic_and_does_not_mutate_input():
    x, y = _regression_data(100)
    params = init_params(REG, np.random.default_rng(0))
    snapshot = [p.copy() for p in params]
    config = TrainConfig(local_epochs=2, batch_size=10, learning_rate=0.05, optimizer="adam")
    a, ra = train_local(REG, params, x, y, config, np.random.default_rng(7))
    b, rb = train_local(REG, params, x, y, config, np.random.default_rng(7))
    c, _ = train_local(REG, params, x, y, config, np.random.default_rng(8))
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True)) and ra == rb
    assert not all(np.array_equal(p, q) for p, q in zip(a, c, strict=True))
    assert all(np.array_equal(p, q) for p, q in zip(params, snapshot, strict=True))


def test_max_steps_caps_training_and_batch_larger_than_data():
    x, y = _regression_data(100)
    params = init_params(REG, np.random.default_rng(0))
    capped = TrainConfig(local_epochs=5, batch_size=10, learning_rate=0.05, max_steps=13)
    _, result = train_local(REG, params, x, y, capped, np.random.default_rng(0))
    assert result.steps == 13 and np.isfinite(result.loss)
    whole = TrainConfig(local_epochs=3, batch_size=1000, learning_rate=0.05)
    _, result = train_local(REG, params, x, y, whole, np.random.default_rng(0))
    assert result.steps == 3


def test_bad_training_inputs_are_refused():
    x, y = _regression_data(10)
    params = init_params(REG, np.random.default_rng(0))
    rng = np.random.default_rng(0)
    for config, match in [
        (TrainConfig(local_epochs=0), "local_epochs"),
        (TrainConfig(batch_size=0), "batch_size"),
        (TrainConfig(learning_rate=-1.0), "learning_rate"),
        (TrainConfig(optimizer="rmsprop"), "optimizer"),
        (TrainConfig(max_steps=-1), "max_steps"),
    ]:
        with pytest.raises(ValueError, match=match):
            train_local(REG, params, x, y, config, rng)
    with pytest.raises(ValueError, match="no training samples"):
        train_local(REG, params, x[:0], y[:0], TrainConfig(), rng)
    with pytest.raises(ValueError, match="targets"):
        train_local(REG, params, x, y[:5], TrainConfig(), rng)


def test_evaluate_regression_rescales_and_scores_anomalies():
    x, y = _regression_data(50)
    params = init_params(REG, np.random.default_rng(0))
    y_shifted = predict(REG, params, x) + np.where(np.arange(50) < 5, 3.0, 0.1).astype(np.float32)
    labels = (np.arange(50) < 5).astype(int)
    report = evaluate(REG, params, x, y_shifted, target_scale=10.0, anomaly_labels=labels)
    assert report["mae"] == pytest.approx(10 * (5 * 3.0 + 45 * 0.1) / 50, rel=1e-4)
    assert report["rmse"] == pytest.approx(np.sqrt(report["mse"]))
    assert report["roc_auc"] == 1.0


def test_quantization_aware_training_trains_through_fake_quant() -> None:
    import msgspec

    from fedcore.learning import quant

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x @ rng.normal(size=6) + 0.1 * rng.normal(size=400)).astype(np.float32)
    spec = ModelSpec("mlp", (6, 16, 1))
    start = init_params(spec, np.random.default_rng(1))
    plain_cfg = TrainConfig(local_epochs=5, batch_size=32, learning_rate=0.01, optimizer="adam")
    qat_cfg = msgspec.structs.replace(plain_cfg, qat=True)
    plain, _ = train_local(spec, start, x, y, plain_cfg, np.random.default_rng(2))
    again, _ = train_local(spec, start, x, y, plain_cfg, np.random.default_rng(2))
    qat, result = train_local(spec, start, x, y, qat_cfg, np.random.default_rng(2))
    assert all(np.array_equal(a, b) for a, b in zip(plain, again, strict=True))  # qat off: unchanged
    assert np.isfinite(result.loss) and result.steps == 5 * 13
    assert not all(np.array_equal(a, b) for a, b in zip(plain, qat, strict=True))
    # the QAT weights fit under int8 fake-quant about as well as float training fits in float
    ranges = quant.calibrate_ranges(spec, qat, x)
    qat_loss, _ = quant.qat_loss_and_grads(spec, qat, x, y, ranges)
    start_loss, _ = quant.qat_loss_and_grads(spec, start, x, y, quant.calibrate_ranges(spec, start, x))
    assert qat_loss < 0.2 * start_loss


def test_qat_and_record_level_dp_do_not_combine() -> None:
    with pytest.raises(ValueError, match="qat"):
        check_train_config(TrainConfig(qat=True, dp_clip=1.0, dp_noise=1.0))
