"""The gateway's inference engine on real LiteRT: batches, int8 I/O, bad models, scores."""

from __future__ import annotations

import dataclasses
import sys

import numpy as np
import pytest

from edge import inference
from edge.inference import InferenceEngine, anomaly_scores, telemetry
from fedcore.errors import RemoteProtocolError
from fedcore.learning import quant, tflite_export
from fedcore.protocol.messages import ModelSpec
from tests.mlp_reference import CLASSIFIER, REGRESSOR, float_outputs, random_params


@pytest.fixture(scope="module")
def regressor() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(21)
    return random_params(REGRESSOR, rng), rng.normal(size=(300, 6)).astype(np.float32)


def test_float_engine_matches_numpy_for_any_batch_size(
    regressor: tuple[list[np.ndarray], np.ndarray],
) -> None:
    params, x = regressor
    engine = InferenceEngine.from_bytes(tflite_export.export_float(REGRESSOR, params))
    assert not engine.quantized and (engine.n_in, engine.n_out) == (6, 1)
    expected = float_outputs(REGRESSOR, params, x)
    for n in (1, 7, 300, 1, 300):  # growing, shrinking and repeating the batch
        got = engine.predict(x[:n])
        assert got.shape == (n, 1) and got.dtype == np.float32
        np.testing.assert_allclose(got, expected[:n], atol=1e-5, rtol=0)
    single = engine.predict(x[3])
    assert single.shape == (1,)
    np.testing.assert_allclose(single, expected[3], atol=1e-5)
    assert engine.predict(x[:0]).shape == (0, 1)


def test_outputs_are_not_overwritten_by_the_next_call(
    regressor: tuple[list[np.ndarray], np.ndarray],
) -> None:
    params, x = regressor
    engine = InferenceEngine.from_bytes(tflite_export.export_float(REGRESSOR, params))
    first = engine.predict(x[:5])
    kept = first.copy()
    engine.predict(x[5:10])
    np.testing.assert_array_equal(first, kept)


def test_int8_engine_quantizes_inputs_and_dequantizes_outputs(
    regressor: tuple[list[np.ndarray], np.ndarray],
) -> None:
    params, x = regressor
    ranges = quant.calibrate_ranges(REGRESSOR, params, x)
    engine = InferenceEngine.from_bytes(tflite_export.export_int8(REGRESSOR, params, ranges=ranges))
    assert engine.quantized
    assert engine.input_qparams == pytest.approx(quant.activation_qparams(*ranges.input))
    assert engine.output_qparams is not None
    step = engine.output_qparams[0]
    got = engine.predict(x)
    assert got.dtype == np.float32
    assert np.abs(got - quant.qat_predict(REGRESSOR, params, x, ranges)).max() <= step * (1 + 1e-6)
    np.testing.assert_allclose(engine.predict(x[:4]), got[:4])


def test_int8_classifier_returns_probabilities() -> None:
    rng = np.random.default_rng(22)
    params = random_params(CLASSIFIER, rng)
    x = rng.normal(size=(200, 24)).astype(np.float32)
    engine = InferenceEngine.from_bytes(tflite_export.export_int8(CLASSIFIER, params, x))
    probs = engine.predict(x)
    assert probs.shape == (200, 4) and probs.min() >= 0.0
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=4 * 4 / 256)
    exact = float_outputs(CLASSIFIER, params, x)
    assert np.mean(probs.argmax(axis=1) == exact.argmax(axis=1)) > 0.97


@pytest.mark.parametrize("data", [b"", b"\x00" * 64, b"garbage!" * 50, bytes(range(256)) * 8])
def test_garbage_bytes_raise_a_peer_error(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        InferenceEngine.from_bytes(data)
    assert caught.value.reason == "bad_tflite"


def test_a_model_the_interpreter_refuses_is_a_peer_error(
    regressor: tuple[list[np.ndarray], np.ndarray],
) -> None:
    params, _ = regressor
    graph = tflite_export._build_graph(REGRESSOR, params, None)
    # A well-formed file whose first kernel expects 7 inputs while the model feeds it 6:
    # the schema check passes, the interpreter's shape check refuses it.
    kernel = dataclasses.replace(
        graph.tensors[1], shape=(32, 7), data=np.zeros((32, 7), np.float32).tobytes()
    )
    broken = dataclasses.replace(graph, tensors=[graph.tensors[0], kernel, *graph.tensors[2:]])
    data = tflite_export._serialize(broken, "inconsistent")
    tflite_export.model_info(data)  # passes the schema check
    with pytest.raises(RemoteProtocolError, match="interpreter refused"):
        InferenceEngine.from_bytes(data)


def test_wrong_feature_count_is_our_error(regressor: tuple[list[np.ndarray], np.ndarray]) -> None:
    params, x = regressor
    engine = InferenceEngine.from_bytes(tflite_export.export_float(REGRESSOR, params))
    with pytest.raises(ValueError, match="n_in=6"):
        engine.predict(np.zeros((3, 5), np.float32))


def test_missing_runtimes_name_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ai_edge_litert.interpreter", None)
    monkeypatch.setitem(sys.modules, "tflite_runtime.interpreter", None)
    with pytest.raises(ImportError, match="ai-edge-litert"):
        inference._interpreter_class()


def test_anomaly_scores_follow_the_model_kind() -> None:
    x = np.array([[1.0, 2.0], [0.0, 0.0]])
    auto = ModelSpec(kind="autoencoder", layer_sizes=(2, 1, 2), task="anomaly")
    np.testing.assert_allclose(
        anomaly_scores(auto, np.array([[1.0, 0.0], [1.0, 1.0]]), x), [2.0, 1.0]
    )
    np.testing.assert_allclose(
        anomaly_scores(REGRESSOR, np.array([[1.5], [0.0]]), x, observed=np.array([1.0, -2.0])),
        [0.5, 2.0],
    )
    np.testing.assert_allclose(
        anomaly_scores(CLASSIFIER, np.array([[0.9, 0.1], [0.5, 0.5]]), x), [0.1, 0.5]
    )
    with pytest.raises(ValueError, match="measured targets"):
        anomaly_scores(REGRESSOR, np.array([[1.0]]), x[:1])


def test_engine_scores_agree_with_the_numpy_model(
    regressor: tuple[list[np.ndarray], np.ndarray],
) -> None:
    from fedcore.learning import models

    params, x = regressor
    observed = np.sin(x[:, 0])
    engine = InferenceEngine.from_bytes(tflite_export.export_float(REGRESSOR, params))
    got = anomaly_scores(REGRESSOR, engine.predict(x), x, observed)
    np.testing.assert_allclose(
        got, models.anomaly_scores(REGRESSOR, params, x, observed), atol=1e-5
    )


def test_telemetry_summarises_scores_and_raises_alerts() -> None:
    calm = telemetry(7, np.array([0.1, 0.2, 0.15]), threshold=1.0)
    assert calm.model_version == 7 and calm.alerts == ()
    assert calm.values["samples"] == 3 and calm.values["score_max"] == pytest.approx(0.2)
    assert calm.values["over_threshold"] == 0
    alarm = telemetry(7, np.array([0.1, 3.0, 0.15, 2.0]), threshold=1.0)
    assert alarm.values["over_threshold"] == 2 and len(alarm.alerts) == 1
    assert "2/4" in alarm.alerts[0]
    assert telemetry(1, np.array([])).values == {"samples": 0.0}
