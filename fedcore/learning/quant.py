"""Int8 fake quantization and quantization-aware training (QAT) for the fedgate MLP.

Theory of operation
-------------------
The gateway runs its model as a full-integer TFLite graph (``tflite_export.export_int8``).
This module simulates that graph in float ("fake quantization") so that

* the exporter and the simulation share one definition of every scale and zero point
  (``weight_scales``, ``activation_qparams``, ``quantize_bias``), and
* training can see the rounding it will suffer on the gateway (QAT).

Quantization scheme (the TFLite int8 spec):

* **Weights**: symmetric, per output channel, zero point 0, values in [-127, 127]. Our
  weights are stored ``(n_in, n_out)`` (``x @ W``); TFLite's FULLY_CONNECTED stores them
  ``[out, in]``, so the per-channel axis is our column axis and TFLite's
  ``quantized_dimension`` 0. ``scale_c = max|W[:, c]| / 127``.
* **Activations**: asymmetric, per tensor, int8 in [-128, 127]. A calibrated float range
  ``[lo, hi]`` is widened to contain 0 (zero must be exact, for padding and for ReLU),
  ``scale = (hi - lo) / 255`` and ``zero_point = round(-128 - lo / scale)``.
* **Biases**: int32, zero point 0, ``scale = input_scale * weight_scale_c``: the
  accumulator's own scale, so the bias adds to the integer dot product without rescaling.
* Fixed-range outputs: TANH writes scale 1/128, zero point 0; SOFTMAX writes scale 1/256,
  zero point -128 (TFLite requires exactly these).

One tensor per dense layer carries a calibrated range: the tensor the FULLY_CONNECTED op
writes. With ReLU the activation is fused into that op, so the range is the post-ReLU
range; with tanh the FC writes the pre-activation (a separate TANH op follows); the last
layer writes outputs (regression) or logits (classification). ``ActivationRanges`` holds
the input range plus one range per layer.

Gradients use the straight-through estimator (STE): rounding is treated as identity,
and an activation fake-quant passes gradient only where the value lay inside its range
(the clipped STE of Jacob et al. 2018), since outside it the int8 output is saturated.

All functions are pure: numpy in, numpy out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec

INT8_MIN = -128
INT8_MAX = 127
WEIGHT_MAX = 127  # TFLite int8 weights use the narrow range [-127, 127]
INT32_MIN = -(2**31)
INT32_MAX = 2**31 - 1
TANH_OUTPUT_QPARAMS = (1.0 / 128.0, 0)
SOFTMAX_OUTPUT_QPARAMS = (1.0 / 256.0, -128)
_MIN_RANGE = 1e-6  # a constant tensor still needs a positive scale


@dataclass(frozen=True)
class ActivationRanges:
    """Calibrated float ranges: the model input, then the tensor each FC op writes."""

    input: tuple[float, float]
    layers: tuple[tuple[float, float], ...]


def check_spec(spec: ModelSpec, params: Sequence[np.ndarray]) -> None:
    """Raise ``ValueError`` if params do not follow the MLP convention of docs/architecture.md
    (as ``fedcore.learning.models`` does; a caller holding a peer's spec wraps it)."""
    sizes = spec.layer_sizes
    if spec.activation not in ("relu", "tanh"):
        raise ValueError(f"unsupported activation {spec.activation!r}")
    if len(params) != 2 * (len(sizes) - 1):
        raise ValueError(f"{len(params)} params for layer sizes {sizes}")
    for i in range(len(sizes) - 1):
        w, b = params[2 * i], params[2 * i + 1]
        if w.shape != (sizes[i], sizes[i + 1]) or b.shape != (sizes[i + 1],):
            raise ValueError(f"layer {i}: shapes {w.shape}, {b.shape} vs sizes {sizes}")


# --- scales shared with the exporter -------------------------------------------------------


def weight_scales(w: np.ndarray) -> np.ndarray:
    """Per-output-channel symmetric scales (float32, one per column of ``W (n_in, n_out)``)."""
    max_abs = np.max(np.abs(np.asarray(w, np.float64)), axis=0)
    # An all-zero channel may take any positive scale; borrow the largest one so the
    # bias of that channel keeps a sensible resolution.
    fallback = float(max_abs.max()) if max_abs.max() > 0 else 1.0
    max_abs = np.where(max_abs > 0, max_abs, fallback)
    return (max_abs / WEIGHT_MAX).astype(np.float32)


def quantize_weights(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W (n_in, n_out)`` -> (int8 values laid out ``[out, in]`` as TFLite wants, scales)."""
    scales = weight_scales(w)
    q = np.clip(np.round(np.asarray(w, np.float64) / scales), -WEIGHT_MAX, WEIGHT_MAX)
    return q.astype(np.int8).T.copy(), scales


def fake_quant_weights(w: np.ndarray) -> np.ndarray:
    """``W`` rounded to the per-channel int8 grid, back in float32 (same layout as ``W``)."""
    q, scales = quantize_weights(w)
    return np.asarray(q.T.astype(np.float32) * scales, dtype=np.float32)


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """(scale, zero_point) of a per-tensor asymmetric int8 tensor covering ``[lo, hi]``."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo < _MIN_RANGE:
        hi = lo + _MIN_RANGE
    scale = (hi - lo) / (INT8_MAX - INT8_MIN)
    zero_point = int(np.clip(np.round(INT8_MIN - lo / scale), INT8_MIN, INT8_MAX))
    return float(np.float32(scale)), zero_point


def quantize(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    q = np.round(np.asarray(x, np.float64) / scale) + zero_point
    return np.clip(q, INT8_MIN, INT8_MAX).astype(np.int8)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return ((q.astype(np.float64) - zero_point) * scale).astype(np.float32)


def fake_quant(x: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    return dequantize(quantize(x, scale, zero_point), scale, zero_point)


def quantize_bias(b: np.ndarray, input_scale: float, w_scales: np.ndarray) -> np.ndarray:
    """int32 bias at the accumulator scale ``input_scale * weight_scale_c``."""
    bias_scale = np.float64(input_scale) * w_scales.astype(np.float64)
    q = np.round(np.asarray(b, np.float64) / bias_scale)
    return np.clip(q, INT32_MIN, INT32_MAX).astype(np.int32)


def fake_quant_bias(b: np.ndarray, input_scale: float, w_scales: np.ndarray) -> np.ndarray:
    bias_scale = np.float64(input_scale) * w_scales.astype(np.float64)
    return (quantize_bias(b, input_scale, w_scales) * bias_scale).astype(np.float32)


# --- calibration --------------------------------------------------------------------------


def _float_observed(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray
) -> list[np.ndarray]:
    """The float tensors that carry a calibrated range: input, then each FC output."""
    h = np.asarray(x, np.float32)
    seen = [h]
    last = len(params) // 2 - 1
    for i in range(last + 1):
        z = h @ params[2 * i] + params[2 * i + 1]
        if i < last and spec.activation == "relu":
            z = np.maximum(z, 0.0)
            h = z
        elif i < last:
            h = np.tanh(z)
        seen.append(z)
    return seen


def observe_ranges(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray
) -> ActivationRanges:
    """Min/max of every quantized tensor over one batch of the float model."""
    check_spec(spec, params)
    seen = [(float(t.min()), float(t.max())) for t in _float_observed(spec, params, x)]
    return ActivationRanges(input=seen[0], layers=tuple(seen[1:]))


def ema_ranges(old: ActivationRanges, new: ActivationRanges, momentum: float) -> ActivationRanges:
    """Exponential moving average of ranges (``momentum`` weighs the old value)."""

    def mix(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
        return (momentum * a[0] + (1 - momentum) * b[0], momentum * a[1] + (1 - momentum) * b[1])

    return ActivationRanges(
        input=mix(old.input, new.input),
        layers=tuple(mix(a, b) for a, b in zip(old.layers, new.layers, strict=True)),
    )


def calibrate_ranges(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x_calib: np.ndarray,
    method: str = "minmax",
    batch_size: int = 256,
    momentum: float = 0.9,
) -> ActivationRanges:
    """Activation ranges from calibration data.

    ``minmax`` takes the extremes over all of ``x_calib`` (no clipping of what was seen);
    ``ema`` averages per-batch extremes, which ignores rare outliers and spends the int8
    grid on the bulk of the data (the TFLite QAT default).
    """
    x = np.asarray(x_calib, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"calibration data must be a non-empty 2-D array, got {x.shape}")
    if method == "minmax":
        return observe_ranges(spec, params, x)
    if method != "ema":
        raise ValueError(f"unknown calibration method {method!r}")
    ranges = observe_ranges(spec, params, x[:batch_size])
    for start in range(batch_size, x.shape[0], batch_size):
        ranges = ema_ranges(
            ranges, observe_ranges(spec, params, x[start : start + batch_size]), momentum
        )
    return ranges


# --- fake-quant forward and STE gradients -------------------------------------------------


@dataclass(frozen=True)
class _Trace:
    """What the backward pass needs from the forward pass."""

    inputs: list[np.ndarray]  # fake-quantized input of each layer
    weights: list[np.ndarray]  # fake-quantized weights of each layer
    pass_masks: list[np.ndarray]  # d(layer output)/d(pre-activation) under the STE
    output: np.ndarray  # fake-quantized last FC output (regression output or logits)


def _qat_trace(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, ranges: ActivationRanges
) -> _Trace:
    check_spec(spec, params)
    n_layers = len(params) // 2
    if len(ranges.layers) != n_layers:
        raise ValueError(f"{len(ranges.layers)} ranges for {n_layers} layers")
    in_scale, in_zp = activation_qparams(*ranges.input)
    h = fake_quant(np.asarray(x, np.float32), in_scale, in_zp)
    trace = _Trace([], [], [], h)
    for i in range(n_layers):
        w_s = weight_scales(params[2 * i])
        wq = fake_quant_weights(params[2 * i])
        bq = fake_quant_bias(params[2 * i + 1], in_scale, w_s)
        trace.inputs.append(h)
        trace.weights.append(wq)
        z = (h.astype(np.float64) @ wq.astype(np.float64) + bq).astype(np.float32)
        out_scale, out_zp = activation_qparams(*ranges.layers[i])
        # Values that round onto the grid are not saturated: the STE passes them.
        lo = (INT8_MIN - 0.5 - out_zp) * out_scale
        hi = (INT8_MAX + 0.5 - out_zp) * out_scale
        hidden = i < n_layers - 1
        if hidden and spec.activation == "relu":
            # Fused ReLU: the int8 clamp at the zero point is the ReLU.
            mask = (z > 0) & (z <= hi)
            h = fake_quant(np.maximum(z, 0.0), out_scale, out_zp)
            in_scale = out_scale
        elif hidden:
            mask_pre = (z >= lo) & (z <= hi)
            zq = fake_quant(z, out_scale, out_zp)
            t = np.tanh(zq)
            h = fake_quant(t, *TANH_OUTPUT_QPARAMS)
            mask = mask_pre * (1.0 - t.astype(np.float64) ** 2)
            in_scale = TANH_OUTPUT_QPARAMS[0]
        else:
            mask = (z >= lo) & (z <= hi)
            h = fake_quant(z, out_scale, out_zp)
        trace.pass_masks.append(np.asarray(mask, np.float64))
    return _Trace(trace.inputs, trace.weights, trace.pass_masks, h)


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True))


def qat_forward(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, ranges: ActivationRanges
) -> np.ndarray:
    """The int8 model simulated in float: regression outputs, or logits for classification."""
    return _qat_trace(spec, params, x, ranges).output


def qat_predict(
    spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray, ranges: ActivationRanges
) -> np.ndarray:
    """What the exported int8 graph outputs (softmax quantized to 1/256 for classification)."""
    out = qat_forward(spec, params, x, ranges)
    if spec.task == "classification":
        return fake_quant(_softmax(out.astype(np.float64)), *SOFTMAX_OUTPUT_QPARAMS)
    return out


def qat_loss_and_grads(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    x: np.ndarray,
    y: np.ndarray | None,
    ranges: ActivationRanges,
) -> tuple[float, Params]:
    """Loss of the fake-quant model and its STE gradients w.r.t. the float params.

    The contract of ``models.loss_and_grads``: regression is the mean squared error over all
    outputs (``y`` of shape ``(n,)`` or ``(n, n_out)``); classification the mean softmax
    cross-entropy against integer class ids; an autoencoder ignores ``y`` and reconstructs
    ``x``. Ranges are held fixed here; refresh them between epochs (``ema_ranges``) so
    that saturated outputs, whose STE gradient is zero, do not stall training.
    """
    trace = _qat_trace(spec, params, x, ranges)
    out = trace.output.astype(np.float64)
    n = out.shape[0]
    if spec.kind == "autoencoder":
        y = x
    if y is None:
        raise ValueError(f"a {spec.task} model needs targets")
    if spec.task == "classification":
        labels = np.asarray(y).astype(np.int64).reshape(-1)
        probs = _softmax(out)
        loss = float(-np.mean(np.log(np.maximum(probs[np.arange(n), labels], 1e-12))))
        d_out = probs
        d_out[np.arange(n), labels] -= 1.0
        d_out /= n
    else:
        target = np.asarray(y, np.float64).reshape(out.shape)
        diff = out - target
        loss = float(np.mean(diff**2))
        d_out = 2.0 * diff / diff.size
    grads: Params = [np.empty(0, np.float32)] * len(params)
    delta = d_out
    for i in reversed(range(len(trace.weights))):
        delta = delta * trace.pass_masks[i]
        # STE: d(fake_quant(W))/dW = 1, so the weight gradient is taken at the quantized point.
        grads[2 * i] = (trace.inputs[i].astype(np.float64).T @ delta).astype(np.float32)
        grads[2 * i + 1] = delta.sum(axis=0).astype(np.float32)
        if i > 0:
            delta = delta @ trace.weights[i].astype(np.float64).T
    return loss, grads
