"""Int8 fake quantization: scales, calibration and straight-through-estimator gradients."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.learning import quant
from fedcore.protocol.messages import ModelSpec
from tests.mlp_reference import CLASSIFIER, REGRESSOR, REGRESSOR_TANH, float_logits, random_params


def test_weights_are_quantized_per_output_channel() -> None:
    rng = np.random.default_rng(1)
    # Column 0 is a thousand times larger than column 1: one per-tensor scale would round
    # column 1 to zero; per-channel scales keep both to within half a step.
    w = np.stack([rng.normal(size=8) * 1e3, rng.normal(size=8)], axis=1).astype(np.float32)
    q, scales = quant.quantize_weights(w)
    assert q.shape == (2, 8) and q.dtype == np.int8  # TFLite FC layout [out, in]
    np.testing.assert_allclose(scales, np.abs(w).max(axis=0) / 127, rtol=1e-6)
    assert np.abs(q).max(axis=1).tolist() == [127, 127]
    assert q.min() >= -127  # narrow range: -128 is never used for weights
    wq = quant.fake_quant_weights(w)
    assert np.all(np.abs(wq - w) <= scales / 2 * (1 + 1e-5))
    assert np.abs(wq[:, 1] - w[:, 1]).max() < 0.01 * np.abs(w[:, 1]).max()
    np.testing.assert_array_equal(quant.fake_quant_weights(wq), wq)  # idempotent


def test_all_zero_channel_gets_a_usable_scale() -> None:
    w = np.array([[0.0, 0.5], [0.0, -1.0]], np.float32)
    scales = quant.weight_scales(w)
    assert np.all(scales > 0)
    np.testing.assert_array_equal(quant.fake_quant_weights(w)[:, 0], [0.0, 0.0])


@pytest.mark.parametrize(
    "lo,hi", [(-1.0, 3.0), (0.3, 2.0), (-5.0, -1.0), (0.0, 0.0), (-0.01, 250.0)]
)
def test_activation_grid_contains_zero_and_covers_the_range(lo: float, hi: float) -> None:
    scale, zp = quant.activation_qparams(lo, hi)
    assert scale > 0 and -128 <= zp <= 127
    assert quant.fake_quant(np.zeros(1), scale, zp)[0] == 0.0
    inside = np.linspace(min(lo, 0.0), max(hi, 0.0), 101)
    err = np.abs(quant.fake_quant(inside, scale, zp) - inside)
    assert err.max() <= scale * 0.5 + 1e-6 * max(1.0, abs(lo), abs(hi))
    # Beyond the range the int8 value saturates.
    assert quant.fake_quant(np.array([hi + 100.0]), scale, zp)[0] == pytest.approx(
        (127 - zp) * scale, rel=1e-6
    )


def test_bias_uses_the_accumulator_scale() -> None:
    b = np.array([0.5, -0.25, 1e-4], np.float32)
    w_scales = np.array([0.01, 0.02, 0.04], np.float32)
    q = quant.quantize_bias(b, 0.05, w_scales)
    assert q.dtype == np.int32
    np.testing.assert_array_equal(q, np.round(b / (0.05 * w_scales.astype(np.float64))))


def test_minmax_calibration_sees_every_quantized_tensor() -> None:
    rng = np.random.default_rng(2)
    params = random_params(REGRESSOR, rng)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    ranges = quant.calibrate_ranges(REGRESSOR, params, x)
    assert ranges.input == pytest.approx((float(x.min()), float(x.max())))
    h1 = np.maximum(x.astype(np.float64) @ params[0] + params[1], 0)
    assert ranges.layers[0] == pytest.approx((h1.min(), h1.max()), rel=1e-5, abs=1e-6)
    assert ranges.layers[0][0] >= 0.0  # fused ReLU: the FC writes post-ReLU values
    out = float_logits(REGRESSOR, params, x)
    assert ranges.layers[-1] == pytest.approx((out.min(), out.max()), rel=1e-5)


def test_tanh_calibration_records_the_pre_activation() -> None:
    rng = np.random.default_rng(3)
    params = random_params(REGRESSOR_TANH, rng)
    x = rng.normal(size=(200, 6)).astype(np.float32) * 3
    ranges = quant.calibrate_ranges(REGRESSOR_TANH, params, x)
    z1 = x.astype(np.float64) @ params[0] + params[1]
    assert ranges.layers[0] == pytest.approx((z1.min(), z1.max()), rel=1e-5)
    assert ranges.layers[0][1] > 1.0  # not squashed by tanh


def test_ema_calibration_discounts_a_rare_outlier() -> None:
    rng = np.random.default_rng(4)
    params = random_params(REGRESSOR, rng)
    x = rng.normal(size=(1024, 6)).astype(np.float32)
    x[5] = 40.0
    minmax = quant.calibrate_ranges(REGRESSOR, params, x, method="minmax")
    ema = quant.calibrate_ranges(REGRESSOR, params, x, method="ema", batch_size=64, momentum=0.8)
    assert minmax.input[1] == pytest.approx(40.0)
    assert ema.input[1] < 10.0
    with pytest.raises(ValueError, match="calibration method"):
        quant.calibrate_ranges(REGRESSOR, params, x, method="percentile")


def test_qat_loss_is_the_loss_of_the_fake_quant_model() -> None:
    rng = np.random.default_rng(5)
    params = random_params(REGRESSOR, rng)
    x = rng.normal(size=(64, 6)).astype(np.float32)
    y = rng.normal(size=64).astype(np.float32)
    calibrated = quant.calibrate_ranges(REGRESSOR, params, x)
    out_lo, out_hi = calibrated.layers[-1]
    # Leave head room so that no output saturates.
    ranges = quant.ActivationRanges(
        calibrated.input, (*calibrated.layers[:-1], (out_lo - 1, out_hi + 1))
    )
    loss, grads = quant.qat_loss_and_grads(REGRESSOR, params, x, y, ranges)
    pred = quant.qat_forward(REGRESSOR, params, x, ranges)
    assert loss == pytest.approx(float(np.mean((pred[:, 0] - y) ** 2)), rel=1e-6)
    # Every output lies inside its calibrated range, so the STE passes the MSE gradient
    # through the output fake-quant unchanged: d loss / d b_last = 2 * mean(pred - y).
    assert grads[-1][0] == pytest.approx(2 * float(np.mean(pred[:, 0] - y)), rel=1e-5)
    assert [g.shape for g in grads] == [p.shape for p in params]
    assert all(g.dtype == np.float32 for g in grads)


@pytest.mark.parametrize("spec", [REGRESSOR, REGRESSOR_TANH, CLASSIFIER])
def test_ste_gradients_point_where_the_float_gradients_point(spec: ModelSpec) -> None:
    rng = np.random.default_rng(6)
    params = random_params(spec, rng)
    n = 128
    x = rng.normal(size=(n, spec.layer_sizes[0])).astype(np.float32)
    y = rng.integers(0, 4, n) if spec.task == "classification" else rng.normal(size=n)
    ranges = quant.calibrate_ranges(spec, params, x)
    _, grads = quant.qat_loss_and_grads(spec, params, x, y, ranges)
    flat_qat = np.concatenate([g.ravel() for g in grads])
    flat_fd = np.concatenate([g.ravel() for g in _finite_difference_grads(spec, params, x, y)])
    cosine = flat_qat @ flat_fd / (np.linalg.norm(flat_qat) * np.linalg.norm(flat_fd))
    assert cosine > 0.98


def _float_loss(spec: ModelSpec, params: list[np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    z = float_logits(spec, params, x)
    if spec.task == "classification":
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-np.mean(logp[np.arange(len(y)), y]))
    return float(np.mean((z[:, 0] - y) ** 2))


def _finite_difference_grads(
    spec: ModelSpec, params: list[np.ndarray], x: np.ndarray, y: np.ndarray, eps: float = 1e-5
) -> list[np.ndarray]:
    p64 = [p.astype(np.float64) for p in params]
    grads = []
    for p in p64:
        g = np.zeros_like(p)
        for idx in np.ndindex(p.shape):
            old = p[idx]
            p[idx] = old + eps
            up = _float_loss(spec, p64, x, y)
            p[idx] = old - eps
            down = _float_loss(spec, p64, x, y)
            p[idx] = old
            g[idx] = (up - down) / (2 * eps)
        grads.append(g)
    return grads


def test_saturated_outputs_pass_no_gradient() -> None:
    rng = np.random.default_rng(7)
    params = random_params(REGRESSOR, rng)
    x = rng.normal(size=(32, 6)).astype(np.float32)
    # Shift every prediction above 5, then give the output the range [0, 1]: all outputs
    # clip at the top of the grid.
    params[-1] = params[-1] + np.float32(5.0 - float_logits(REGRESSOR, params, x).min())
    ranges = quant.calibrate_ranges(REGRESSOR, params, x)
    clipped = quant.ActivationRanges(ranges.input, (*ranges.layers[:-1], (0.0, 1.0)))
    _, grads = quant.qat_loss_and_grads(REGRESSOR, params, x, np.zeros(32), clipped)
    assert all(np.all(g == 0) for g in grads)
    _, free = quant.qat_loss_and_grads(REGRESSOR, params, x, np.zeros(32), ranges)
    assert np.any(free[-1] != 0)


def test_autoencoder_reconstructs_its_input() -> None:
    spec = ModelSpec(kind="autoencoder", layer_sizes=(5, 3, 5), task="anomaly")
    rng = np.random.default_rng(8)
    params = random_params(spec, rng)
    x = rng.normal(size=(40, 5)).astype(np.float32)
    ranges = quant.calibrate_ranges(spec, params, x)
    loss, _ = quant.qat_loss_and_grads(spec, params, x, None, ranges)
    recon = quant.qat_forward(spec, params, x, ranges)
    assert loss == pytest.approx(float(np.mean((recon - x) ** 2)), rel=1e-6)


def test_qat_training_lowers_the_int8_loss() -> None:
    rng = np.random.default_rng(9)
    spec = ModelSpec(kind="mlp", layer_sizes=(4, 16, 1))
    x = rng.normal(size=(256, 4)).astype(np.float32)
    y = (np.sin(x[:, 0]) + 0.5 * x[:, 1] * x[:, 2]).astype(np.float32)
    params = random_params(spec, rng)
    ranges = quant.calibrate_ranges(spec, params, x)
    start, _ = quant.qat_loss_and_grads(spec, params, x, y, ranges)
    for _epoch in range(30):
        for i in range(0, 256, 32):
            _, grads = quant.qat_loss_and_grads(spec, params, x[i : i + 32], y[i : i + 32], ranges)
            params = [p - 0.05 * g for p, g in zip(params, grads, strict=True)]
        ranges = quant.ema_ranges(ranges, quant.observe_ranges(spec, params, x), 0.5)
    end, _ = quant.qat_loss_and_grads(spec, params, x, y, ranges)
    assert end < 0.5 * start


def test_shapes_that_break_the_convention_are_refused() -> None:
    rng = np.random.default_rng(10)
    params = random_params(REGRESSOR, rng)
    with pytest.raises(ValueError, match="layer 1"):
        quant.check_spec(REGRESSOR, [params[0], params[1], params[2].T, params[3], *params[4:]])
    with pytest.raises(ValueError, match="activation"):
        quant.check_spec(
            ModelSpec(kind="mlp", layer_sizes=(6, 32, 16, 1), activation="gelu"), params
        )
