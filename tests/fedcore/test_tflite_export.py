"""The .tflite writer, checked in the real LiteRT interpreter against numpy references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from fedcore.errors import RemoteProtocolError
from fedcore.learning import quant, tflite_export
from fedcore.protocol.messages import ModelSpec
from tests.mlp_reference import (
    CLASSIFIER,
    CLASSIFIER_TANH,
    REGRESSOR,
    REGRESSOR_TANH,
    float_outputs,
    random_params,
    run_litert,
)

SPECS = [REGRESSOR, REGRESSOR_TANH, CLASSIFIER, CLASSIFIER_TANH]


def _data(spec: ModelSpec, seed: int, n: int = 400) -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return random_params(spec, rng), rng.normal(size=(n, spec.layer_sizes[0])).astype(np.float32)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.task}-{s.activation}")
def test_float_model_matches_numpy(spec: ModelSpec) -> None:
    params, x = _data(spec, 11)
    got, _ = run_litert(tflite_export.export_float(spec, params), x)
    np.testing.assert_allclose(got, float_outputs(spec, params, x), atol=1e-5, rtol=0)
    if spec.task == "classification":
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.task}-{s.activation}")
def test_int8_model_is_within_one_step_of_the_fake_quant_reference(spec: ModelSpec) -> None:
    params, x = _data(spec, 12)
    ranges = quant.calibrate_ranges(spec, params, x)
    got, step = run_litert(tflite_export.export_int8(spec, params, ranges=ranges), x)
    assert step is not None
    reference = quant.qat_predict(spec, params, x, ranges)
    assert np.abs(got - reference).max() <= step * (1 + 1e-6)
    # And the int8 model is close to the float one it came from.
    exact = float_outputs(spec, params, x)
    if spec.task == "classification":
        assert step == pytest.approx(1 / 256)
        assert np.abs(got - exact).max() < 0.05
        assert np.mean(got.argmax(axis=1) == exact.argmax(axis=1)) > 0.97
    else:
        span = exact.max() - exact.min()
        assert np.abs(got - exact).max() < 0.03 * span


def test_calibration_data_and_explicit_minmax_ranges_give_the_same_file() -> None:
    params, x = _data(REGRESSOR, 13)
    ranges = quant.calibrate_ranges(REGRESSOR, params, x)
    assert tflite_export.export_int8(REGRESSOR, params, x) == tflite_export.export_int8(
        REGRESSOR, params, ranges=ranges
    )
    with pytest.raises(ValueError, match="calibration"):
        tflite_export.export_int8(REGRESSOR, params)


def test_int8_file_layout() -> None:
    params, x = _data(CLASSIFIER, 14)
    ranges = quant.calibrate_ranges(CLASSIFIER, params, x)
    info = tflite_export.model_info(tflite_export.export_int8(CLASSIFIER, params, ranges=ranges))
    assert info.schema_version == 3
    assert info.operators == (("FULLY_CONNECTED", 5), ("FULLY_CONNECTED", 5), ("SOFTMAX", 2))
    assert (info.input.dtype, info.input.shape) == ("int8", (1, 24))
    assert info.input.scales[0] == pytest.approx(quant.activation_qparams(*ranges.input)[0])
    assert (info.output.dtype, info.output.scales, info.output.zero_points) == (
        "int8",
        (1 / 256,),
        (-128,),
    )
    by_name = {t.name: t for t in info.tensors}
    kernel, bias = by_name["dense0/kernel"], by_name["dense0/bias"]
    assert (kernel.dtype, kernel.shape, kernel.quantized_dimension) == ("int8", (32, 24), 0)
    np.testing.assert_allclose(kernel.scales, quant.weight_scales(params[0]), rtol=1e-6)
    assert kernel.constant_bytes == 32 * 24
    assert bias.dtype == "int32" and len(bias.scales) == 32
    np.testing.assert_allclose(
        bias.scales, np.array(kernel.scales) * info.input.scales[0], rtol=1e-6
    )
    assert by_name["dense1/kernel"].scales == pytest.approx(
        tuple(quant.weight_scales(params[2])), rel=1e-6
    )


def test_float_file_layout_and_size() -> None:
    spec = ModelSpec(kind="mlp", layer_sizes=(24, 64, 64, 4), task="classification")
    params, x = _data(spec, 15, n=50)
    float_bytes = tflite_export.export_float(spec, params)
    int8_bytes = tflite_export.export_int8(spec, params, x)
    info = tflite_export.model_info(float_bytes)
    assert info.operators == (("FULLY_CONNECTED", 1),) * 3 + (("SOFTMAX", 1),)
    assert info.input.dtype == "float32" and info.output.dtype == "float32"
    assert info.size_bytes == len(float_bytes)
    weights = sum(p.size for p in params)
    assert len(float_bytes) > 4 * weights and len(int8_bytes) < 0.5 * len(
        float_bytes
    )  # scales and zero points cost too


def test_tanh_models_run_a_separate_tanh_operator() -> None:
    params, x = _data(REGRESSOR_TANH, 16)
    info = tflite_export.model_info(tflite_export.export_int8(REGRESSOR_TANH, params, x))
    assert [name for name, _ in info.operators] == [
        "FULLY_CONNECTED",
        "TANH",
        "FULLY_CONNECTED",
        "TANH",
        "FULLY_CONNECTED",
    ]
    tanh_out = {t.name: t for t in info.tensors}["dense0/tanh"]
    assert (tanh_out.scales, tanh_out.zero_points) == ((1 / 128,), (0,))


def _reason(data: bytes) -> str:
    with pytest.raises(RemoteProtocolError) as caught:
        tflite_export.model_info(data)
    assert caught.value.reason == "bad_tflite"
    return caught.value.detail


def test_malformed_files_are_rejected_with_a_reason() -> None:
    params, _ = _data(REGRESSOR, 17)
    good = tflite_export.export_float(REGRESSOR, params)
    assert "plausible" in _reason(b"")
    assert "identifier" in _reason(b"garbage!" * 20)
    assert "identifier" in _reason(good[:4] + b"XXXX" + good[8:])
    _reason(good[: len(good) // 3])  # truncated: offsets point past the end
    # A corrupted root offset sends the reader out of bounds.
    _reason(b"\xff\xff\xff\x7f" + good[4:])


def test_inconsistent_graphs_are_rejected_before_any_interpreter_sees_them() -> None:
    params, _ = _data(REGRESSOR, 18)
    graph = tflite_export._build_graph(REGRESSOR, params, None)
    short = dataclasses.replace(graph.tensors[1], data=graph.tensors[1].data[:16])  # type: ignore[index]
    broken = dataclasses.replace(graph, tensors=[graph.tensors[0], short, *graph.tensors[2:]])
    assert "does not fit shape" in _reason(tflite_export._serialize(broken, "short constant"))
    dangling = dataclasses.replace(graph.ops[0], inputs=(0, 1, 99))
    broken = dataclasses.replace(graph, ops=[dangling, *graph.ops[1:]])
    assert "missing tensors" in _reason(tflite_export._serialize(broken, "dangling index"))


def test_specs_that_do_not_match_the_params_are_refused() -> None:
    params, _ = _data(REGRESSOR, 19)
    with pytest.raises(ValueError):
        tflite_export.export_float(CLASSIFIER, params)
