"""A float64 numpy MLP written from the Params convention alone, plus a raw LiteRT runner.

The quantization and export tests compare against this independent reference rather than
against the code under test.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from ai_edge_litert.interpreter import Interpreter

from fedcore.learning.params import Params
from fedcore.protocol.messages import ModelSpec

REGRESSOR = ModelSpec(kind="mlp", layer_sizes=(6, 32, 16, 1))
REGRESSOR_TANH = ModelSpec(kind="mlp", layer_sizes=(6, 32, 16, 1), activation="tanh")
CLASSIFIER = ModelSpec(kind="mlp", layer_sizes=(24, 32, 4), task="classification")
CLASSIFIER_TANH = ModelSpec(
    kind="mlp", layer_sizes=(24, 32, 4), activation="tanh", task="classification"
)


def random_params(spec: ModelSpec, rng: np.random.Generator) -> Params:
    params: Params = []
    sizes = spec.layer_sizes
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=False):
        params.append((rng.normal(size=(n_in, n_out)) * np.sqrt(2.0 / n_in)).astype(np.float32))
        params.append((rng.normal(size=n_out) * 0.1).astype(np.float32))
    return params


def float_logits(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    h = np.asarray(x, np.float64)
    last = len(params) // 2 - 1
    for i in range(last + 1):
        h = h @ params[2 * i].astype(np.float64) + params[2 * i + 1].astype(np.float64)
        if i < last:
            h = np.maximum(h, 0.0) if spec.activation == "relu" else np.tanh(h)
    return h


def float_outputs(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    """What the exported graph should compute: softmax probabilities for a classifier."""
    z = float_logits(spec, params, x)
    if spec.task == "classification":
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return np.asarray(e / e.sum(axis=1, keepdims=True))
    return z


def run_litert(model: bytes, x: np.ndarray) -> tuple[np.ndarray, float | None]:
    """Run a .tflite in the real LiteRT interpreter; returns (float outputs, output scale)."""
    interpreter = Interpreter(model_content=model)
    inp = interpreter.get_input_details()[0]
    out = interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    if inp["dtype"] == np.int8:
        scale, zp = inp["quantization"]
        feed = np.clip(np.round(x.astype(np.float64) / scale) + zp, -128, 127).astype(np.int8)
    else:
        feed = x.astype(np.float32)
    interpreter.set_tensor(inp["index"], feed)
    interpreter.invoke()
    raw = interpreter.get_tensor(out["index"])
    if out["dtype"] == np.int8:
        scale, zp = out["quantization"]
        return (raw.astype(np.float64) - zp) * scale, float(scale)
    return raw.astype(np.float64), None
