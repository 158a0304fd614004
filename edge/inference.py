"""On-gateway inference: run an exported .tflite model with LiteRT and score what it sees.

Theory of operation
-------------------
``InferenceEngine.from_bytes`` first checks the model with the schema reader
(``fedcore.learning.tflite_export.model_info``): a malformed or unexpected model from the
wire becomes a ``RemoteProtocolError('bad_tflite', ...)`` before any native code parses
it. Only then is it handed to the interpreter: ``ai_edge_litert`` (LiteRT), or the older
``tflite_runtime`` when LiteRT is not installed.

``predict`` takes float features (already scaled, as in training) and returns float
outputs whatever the model's dtype: for a full-integer model it quantizes the input with
the input tensor's (scale, zero point) and dequantizes the output, so callers never see
int8. A batch of any size runs in one invocation; the input tensor is resized (and the
tensors re-allocated) only when the batch size changes.

``anomaly_scores`` turns outputs into one score per sample, the same definitions as
``fedcore.learning.models.anomaly_scores``: autoencoder, mean squared reconstruction
error; regression, mean absolute residual against the measured target; classification,
one minus the top class probability. ``telemetry`` packs scores into the body published
on ``fg/{fleet}/telemetry/{device}``.

Apart from the interpreter this module is pure: no clocks, files or sockets. An engine is
not thread-safe (the interpreter owns its tensors); use one per thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fedcore.errors import RemoteProtocolError
from fedcore.learning.tflite_export import ModelInfo, model_info
from fedcore.protocol.messages import ModelSpec, Telemetry


def _interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # gateways with only the legacy runtime
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ImportError("install ai-edge-litert (or tflite-runtime) for inference") from exc
    return Interpreter


def _qparams(detail: dict[str, Any]) -> tuple[float, int] | None:
    if detail["dtype"] != np.int8:
        return None
    scale, zero_point = detail["quantization"]
    return float(scale), int(zero_point)


class InferenceEngine:
    """One loaded model. Build it with :meth:`from_bytes`."""

    def __init__(self, interpreter: Any, info: ModelInfo) -> None:
        self._interpreter = interpreter
        self.info = info
        self._input = interpreter.get_input_details()[0]
        self._output = interpreter.get_output_details()[0]
        self.n_in = int(info.input.shape[-1])
        self.n_out = int(info.output.shape[-1])
        self.input_qparams = _qparams(self._input)
        self.output_qparams = _qparams(self._output)
        self._batch = int(self._input["shape"][0])

    @classmethod
    def from_bytes(cls, tflite_bytes: bytes, num_threads: int = 1) -> InferenceEngine:
        """Check and load a model; a bad one raises ``RemoteProtocolError('bad_tflite')``."""
        info = model_info(tflite_bytes)
        if len(info.input.shape) != 2 or len(info.output.shape) != 2:
            raise RemoteProtocolError("bad_tflite", "input and output must be [batch, features]")
        interpreter_class = _interpreter_class()
        try:
            interpreter = interpreter_class(
                model_content=bytes(tflite_bytes), num_threads=num_threads
            )
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise RemoteProtocolError(
                "bad_tflite", f"interpreter refused the model: {exc}"
            ) from exc
        return cls(interpreter, info)

    @property
    def quantized(self) -> bool:
        return self.input_qparams is not None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Float outputs ``(n, n_out)`` for features ``(n, n_in)`` (or one sample ``(n_in,)``,
        giving ``(n_out,)``)."""
        features = np.asarray(x, dtype=np.float32)
        single = features.ndim == 1
        if single:
            features = features[None, :]
        if features.ndim != 2 or features.shape[1] != self.n_in:
            raise ValueError(f"input shape {np.shape(x)} does not match n_in={self.n_in}")
        n = features.shape[0]
        if n == 0:
            return np.zeros((0, self.n_out), np.float32)
        if n != self._batch:
            self._interpreter.resize_tensor_input(self._input["index"], [n, self.n_in])
            self._interpreter.allocate_tensors()
            self._batch = n
        feed: np.ndarray = features
        if self.input_qparams is not None:
            scale, zero_point = self.input_qparams
            q = np.round(features.astype(np.float64) / scale) + zero_point
            feed = np.clip(q, -128, 127).astype(np.int8)
        self._interpreter.set_tensor(self._input["index"], feed)
        self._interpreter.invoke()
        raw = self._interpreter.get_tensor(self._output["index"])
        if self.output_qparams is not None:
            scale, zero_point = self.output_qparams
            out = ((raw.astype(np.float64) - zero_point) * scale).astype(np.float32)
        else:
            out = np.array(raw, dtype=np.float32)  # a copy: the interpreter reuses its buffer
        return np.asarray(out[0] if single else out)


def anomaly_scores(
    spec: ModelSpec, outputs: np.ndarray, x: np.ndarray, observed: np.ndarray | None = None
) -> np.ndarray:
    """One score per sample from model outputs, higher = more anomalous (see module doc).

    ``outputs`` are what :meth:`InferenceEngine.predict` returned for features ``x``;
    ``observed`` is the measured target (regression only).
    """
    out = np.asarray(outputs, np.float64)
    if out.ndim == 1:
        out = out[None, :]
    if spec.kind == "autoencoder":
        return np.asarray(
            np.mean(np.square(out - np.asarray(x, np.float64).reshape(out.shape)), axis=1)
        )
    if spec.task == "classification":
        return np.asarray(1.0 - out.max(axis=1))
    if observed is None:
        raise ValueError("anomaly scores of a regression model need the measured targets")
    truth = np.asarray(observed, np.float64).reshape(out.shape)
    return np.asarray(np.mean(np.abs(out - truth), axis=1))


def telemetry(model_version: int, scores: np.ndarray, threshold: float | None = None) -> Telemetry:
    """The telemetry body for one batch: score summary, and an alert if any score passed
    ``threshold``."""
    s = np.asarray(scores, np.float64).reshape(-1)
    if s.size == 0:
        return Telemetry(model_version=model_version, values={"samples": 0.0})
    values = {
        "samples": float(s.size),
        "score_mean": float(s.mean()),
        "score_max": float(s.max()),
        "score_last": float(s[-1]),
    }
    alerts: tuple[str, ...] = ()
    if threshold is not None:
        over = int(np.count_nonzero(s > threshold))
        values["over_threshold"] = float(over)
        if over:
            alerts = (
                f"anomaly score {s.max():.4g} above {threshold:.4g} in {over}/{s.size} samples",
            )
    return Telemetry(model_version=model_version, values=values, alerts=alerts)
