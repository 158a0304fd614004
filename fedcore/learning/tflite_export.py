"""Write the fedgate MLP as a .tflite flatbuffer (float32 or full-integer int8), no TensorFlow.

Theory of operation
-------------------
A model is first laid out as a small graph description (``_Graph``: tensors, constant data,
quantization, operators), then serialized with ``flatbuffers`` using the builder functions
of the ``tflite`` schema package. The graph per dense layer ``i`` is::

    h_i --FULLY_CONNECTED(W_i^T, b_i, fused RELU | NONE)--> z_i [--TANH--> h_{i+1}]

and classification ends with SOFTMAX. Tensors are ``[batch, features]`` with shape
signature ``[-1, features]`` so the interpreter can resize the batch.

Float export: weights are stored ``[out, in]`` (TFLite's FC layout, i.e. ``W.T``) in float32.

Int8 export (full integer, the TFLite int8 spec; scales come from ``fedcore.learning.quant``
so the exported graph and the numpy fake-quant reference agree by construction): int8
input and output with their (scale, zero point); per-channel symmetric int8 weights
(``quantized_dimension`` 0, which needs FULLY_CONNECTED version 5); int32 biases at scale
``input_scale * weight_scale_c``; TANH output at 1/128 and SOFTMAX output at 1/256 with zero
point -128.

Format rules the writer respects: buffer 0 is the empty sentinel that tensors without data
point at; constant data is 16-byte aligned; file identifier ``TFL3``; schema version 3.

``model_info`` reads a .tflite back with the schema reader and checks it (indices in range,
constant sizes match shapes, quantization well-formed, only the operators fedgate writes).
The gateway runs it before handing bytes to the interpreter, so a malformed model from the
wire is a ``RemoteProtocolError`` rather than undefined behaviour in native code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np
import tflite

from fedcore.errors import RemoteProtocolError
from fedcore.learning import quant
from fedcore.protocol.messages import ModelSpec

_FC = tflite.BuiltinOperator.FULLY_CONNECTED
_SOFTMAX = tflite.BuiltinOperator.SOFTMAX
_TANH = tflite.BuiltinOperator.TANH
_OP_NAMES = {_FC: "FULLY_CONNECTED", _SOFTMAX: "SOFTMAX", _TANH: "TANH"}
_FLOAT32, _INT32, _INT8 = tflite.TensorType.FLOAT32, tflite.TensorType.INT32, tflite.TensorType.INT8
_DTYPES: dict[int, np.dtype[Any]] = {
    _FLOAT32: np.dtype(np.float32),
    _INT32: np.dtype(np.int32),
    _INT8: np.dtype(np.int8),
}
_SCHEMA_VERSION = 3
MAX_MODEL_BYTES = 64 * 1024 * 1024  # far above any gateway MLP; bounds what we parse


@dataclass(frozen=True)
class _Quant:
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    dimension: int = 0


@dataclass(frozen=True)
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: int
    data: bytes | None = None
    quant: _Quant | None = None


@dataclass(frozen=True)
class _Op:
    code: int
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    fused_relu: bool = False


@dataclass
class _Graph:
    int8: bool
    tensors: list[_Tensor] = field(default_factory=list)
    ops: list[_Op] = field(default_factory=list)

    def add(self, tensor: _Tensor) -> int:
        self.tensors.append(tensor)
        return len(self.tensors) - 1


def _activation(n: int, name: str, int8: bool, qparams: tuple[float, int]) -> _Tensor:
    if not int8:
        return _Tensor(name, (1, n), _FLOAT32)
    return _Tensor(name, (1, n), _INT8, quant=_Quant((qparams[0],), (qparams[1],)))


def _build_graph(
    spec: ModelSpec, params: Sequence[np.ndarray], ranges: quant.ActivationRanges | None
) -> _Graph:
    quant.check_spec(spec, params)
    int8 = ranges is not None
    sizes = spec.layer_sizes
    g = _Graph(int8=int8)
    in_q = quant.activation_qparams(*ranges.input) if ranges else (1.0, 0)
    h = g.add(_activation(sizes[0], "input", int8, in_q))
    n_layers = len(sizes) - 1
    for i in range(n_layers):
        w = np.asarray(params[2 * i], np.float32)
        b = np.asarray(params[2 * i + 1], np.float32)
        n_out = sizes[i + 1]
        hidden = i < n_layers - 1
        if ranges is None:
            w_t = _Tensor(f"dense{i}/kernel", (n_out, sizes[i]), _FLOAT32, w.T.copy().tobytes())
            b_t = _Tensor(f"dense{i}/bias", (n_out,), _FLOAT32, b.tobytes())
            out_q = (1.0, 0)
        else:
            w_q, w_s = quant.quantize_weights(w)
            zeros = (0,) * n_out
            w_t = _Tensor(
                f"dense{i}/kernel",
                (n_out, sizes[i]),
                _INT8,
                w_q.tobytes(),
                _Quant(tuple(float(s) for s in w_s), zeros, 0),
            )
            b_s = (np.float64(in_q[0]) * w_s.astype(np.float64)).astype(np.float32)
            b_t = _Tensor(
                f"dense{i}/bias",
                (n_out,),
                _INT32,
                quant.quantize_bias(b, in_q[0], w_s).tobytes(),
                _Quant(tuple(float(s) for s in b_s), zeros, 0),
            )
            out_q = quant.activation_qparams(*ranges.layers[i])
        relu = hidden and spec.activation == "relu"
        w_idx, b_idx = g.add(w_t), g.add(b_t)
        z = g.add(_activation(n_out, f"dense{i}/out", int8, out_q))
        g.ops.append(_Op(_FC, (h, w_idx, b_idx), (z,), fused_relu=relu))
        h, in_q = z, out_q
        if hidden and spec.activation == "tanh":
            h = g.add(_activation(n_out, f"dense{i}/tanh", int8, quant.TANH_OUTPUT_QPARAMS))
            g.ops.append(_Op(_TANH, (z,), (h,)))
            in_q = quant.TANH_OUTPUT_QPARAMS
    if spec.task == "classification":
        probs = g.add(_activation(sizes[-1], "softmax", int8, quant.SOFTMAX_OUTPUT_QPARAMS))
        g.ops.append(_Op(_SOFTMAX, (h,), (probs,)))
    return g


# --- serialization ------------------------------------------------------------------------


def _op_version(code: int, int8: bool) -> int:
    if not int8:
        return 1
    return 5 if code == _FC else 2  # FC per-channel int8 is version 5; int8 TANH/SOFTMAX 2


def _bytes_vector(b: flatbuffers.Builder, data: bytes) -> int:
    # 16-byte alignment lets the runtime read constants in place.
    b.StartVector(1, len(data), 16)
    b.head = b.head - len(data)
    b.Bytes[b.head : b.head + len(data)] = data
    return int(b.EndVector())


def _serialize(g: _Graph, description: str) -> bytes:
    b = flatbuffers.Builder(4096)
    opcodes = sorted({op.code for op in g.ops})
    # Buffers: 0 is the empty sentinel, then one per constant tensor.
    buffer_of: dict[int, int] = {}
    data_vectors: list[int] = []
    for idx, t in enumerate(g.tensors):
        if t.data is not None:
            buffer_of[idx] = len(data_vectors) + 1
            data_vectors.append(_bytes_vector(b, t.data))
    buffers = []
    for vec in [None, *data_vectors]:
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        buffers.append(tflite.BufferEnd(b))
    tensors = []
    for idx, t in enumerate(g.tensors):
        name = b.CreateString(t.name)
        shape = b.CreateNumpyVector(np.array(t.shape, np.int32))
        signature = b.CreateNumpyVector(
            np.array((-1, *t.shape[1:]) if t.data is None else t.shape, np.int32)
        )
        q_off = None
        if t.quant is not None:
            scales = b.CreateNumpyVector(np.array(t.quant.scales, np.float32))
            zps = b.CreateNumpyVector(np.array(t.quant.zero_points, np.int64))
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scales)
            tflite.QuantizationParametersAddZeroPoint(b, zps)
            tflite.QuantizationParametersAddQuantizedDimension(b, t.quant.dimension)
            q_off = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddShapeSignature(b, signature)
        tflite.TensorAddType(b, t.dtype)
        tflite.TensorAddBuffer(b, buffer_of.get(idx, 0))
        tflite.TensorAddName(b, name)
        if q_off is not None:
            tflite.TensorAddQuantization(b, q_off)
        tensors.append(tflite.TensorEnd(b))
    operators = []
    for op in g.ops:
        ins = b.CreateNumpyVector(np.array(op.inputs, np.int32))
        outs = b.CreateNumpyVector(np.array(op.outputs, np.int32))
        options, options_type = None, tflite.BuiltinOptions.NONE
        if op.code == _FC:
            tflite.FullyConnectedOptionsStart(b)
            relu = tflite.ActivationFunctionType.RELU
            tflite.FullyConnectedOptionsAddFusedActivationFunction(b, relu if op.fused_relu else 0)
            options, options_type = (
                tflite.FullyConnectedOptionsEnd(b),
                tflite.BuiltinOptions.FullyConnectedOptions,
            )
        elif op.code == _SOFTMAX:
            tflite.SoftmaxOptionsStart(b)
            tflite.SoftmaxOptionsAddBeta(b, 1.0)
            options, options_type = (
                tflite.SoftmaxOptionsEnd(b),
                tflite.BuiltinOptions.SoftmaxOptions,
            )
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, opcodes.index(op.code))
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if options is not None:
            tflite.OperatorAddBuiltinOptionsType(b, options_type)
            tflite.OperatorAddBuiltinOptions(b, options)
        operators.append(tflite.OperatorEnd(b))

    def offsets(items: list[int]) -> int:
        b.StartVector(4, len(items), 4)
        for item in reversed(items):
            b.PrependUOffsetTRelative(item)
        return int(b.EndVector())

    tensors_vec, operators_vec = offsets(tensors), offsets(operators)
    graph_inputs = b.CreateNumpyVector(np.array([0], np.int32))
    graph_outputs = b.CreateNumpyVector(np.array([g.ops[-1].outputs[0]], np.int32))
    sg_name = b.CreateString("main")
    tflite.SubGraphStart(b)
    tflite.SubGraphAddTensors(b, tensors_vec)
    tflite.SubGraphAddInputs(b, graph_inputs)
    tflite.SubGraphAddOutputs(b, graph_outputs)
    tflite.SubGraphAddOperators(b, operators_vec)
    tflite.SubGraphAddName(b, sg_name)
    subgraph = tflite.SubGraphEnd(b)
    codes = []
    for code in opcodes:
        tflite.OperatorCodeStart(b)
        tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))
        tflite.OperatorCodeAddBuiltinCode(b, code)
        tflite.OperatorCodeAddVersion(b, _op_version(code, g.int8))
        codes.append(tflite.OperatorCodeEnd(b))
    codes_vec, subgraphs_vec, buffers_vec = offsets(codes), offsets([subgraph]), offsets(buffers)
    desc = b.CreateString(description)
    tflite.ModelStart(b)
    tflite.ModelAddVersion(b, _SCHEMA_VERSION)
    tflite.ModelAddOperatorCodes(b, codes_vec)
    tflite.ModelAddSubgraphs(b, subgraphs_vec)
    tflite.ModelAddDescription(b, desc)
    tflite.ModelAddBuffers(b, buffers_vec)
    b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
    return bytes(b.Output())


def export_float(spec: ModelSpec, params: Sequence[np.ndarray]) -> bytes:
    """A float32 .tflite computing the same function as the numpy model (softmax added for
    classification)."""
    return _serialize(_build_graph(spec, params, None), "fedgate float32 mlp")


def export_int8(
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    calibration_x: np.ndarray | None = None,
    ranges: quant.ActivationRanges | None = None,
) -> bytes:
    """A full-integer int8 .tflite; activation ranges come from ``ranges`` (e.g. kept by QAT)
    or are calibrated (min/max) on ``calibration_x``."""
    if ranges is None:
        if calibration_x is None:
            raise ValueError("export_int8 needs calibration_x or ranges")
        ranges = quant.calibrate_ranges(spec, params, calibration_x)
    return _serialize(_build_graph(spec, params, ranges), "fedgate int8 mlp")


# --- reading back and checking -------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    scales: tuple[float, ...]
    zero_points: tuple[int, ...]
    quantized_dimension: int
    constant_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    schema_version: int
    description: str
    operators: tuple[tuple[str, int], ...]  # (builtin name, op version), in execution order
    tensors: tuple[TensorInfo, ...]
    input: TensorInfo
    output: TensorInfo
    size_bytes: int


def _bad(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError("bad_tflite", detail)


def _tensor_info(model: tflite.Model, t: tflite.Tensor) -> TensorInfo:
    dtype = t.Type()
    if dtype not in _DTYPES:
        raise _bad(f"tensor type {dtype} is not float32/int32/int8")
    shape = tuple(int(d) for d in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    if any(d <= 0 for d in shape) or len(shape) > 4:
        raise _bad(f"tensor shape {shape} is not positive with rank <= 4")
    if not 0 <= t.Buffer() < model.BuffersLength():
        raise _bad(f"tensor buffer index {t.Buffer()} out of range")
    buf = model.Buffers(t.Buffer())
    nbytes = int(buf.DataLength()) if buf is not None else 0
    if nbytes and nbytes != int(np.prod(shape)) * _DTYPES[dtype].itemsize:
        raise _bad(f"constant of {nbytes} bytes does not fit shape {shape} {_DTYPES[dtype]}")
    scales: tuple[float, ...] = ()
    zps: tuple[int, ...] = ()
    dim = 0
    q = t.Quantization()
    if q is not None and q.ScaleLength():
        scales = tuple(float(s) for s in q.ScaleAsNumpy())
        zps = tuple(int(z) for z in q.ZeroPointAsNumpy()) if q.ZeroPointLength() else ()
        dim = int(q.QuantizedDimension())
        if not all(np.isfinite(s) and s > 0 for s in scales) or len(zps) != len(scales):
            raise _bad("quantization scales must be finite, positive and match zero points")
        if len(scales) > 1 and (dim >= len(shape) or shape[dim] != len(scales)):
            raise _bad(f"{len(scales)} per-channel scales on dimension {dim} of shape {shape}")
    if dtype == _INT8 and not scales:
        raise _bad("int8 tensor without quantization parameters")
    name = t.Name().decode("utf-8", "replace") if t.Name() else ""
    return TensorInfo(name, str(_DTYPES[dtype]), shape, scales, zps, dim, nbytes)


def _read(data: bytes) -> ModelInfo:
    if not tflite.Model.ModelBufferHasIdentifier(data, 0):
        raise _bad("missing TFL3 file identifier")
    model = tflite.Model.GetRootAsModel(data, 0)
    if model.Version() != _SCHEMA_VERSION:
        raise _bad(f"schema version {model.Version()}")
    if model.SubgraphsLength() != 1:
        raise _bad(f"{model.SubgraphsLength()} subgraphs, expected 1")
    if model.BuffersLength() < 1 or model.Buffers(0).DataLength() != 0:
        raise _bad("buffer 0 must be the empty sentinel")
    sg = model.Subgraphs(0)
    tensors = tuple(_tensor_info(model, sg.Tensors(i)) for i in range(sg.TensorsLength()))
    codes = []
    for i in range(model.OperatorCodesLength()):
        oc = model.OperatorCodes(i)
        code = max(int(oc.BuiltinCode()), int(oc.DeprecatedBuiltinCode()))
        if code not in _OP_NAMES:
            raise _bad(f"operator {code} is not one fedgate writes")
        codes.append((_OP_NAMES[code], int(oc.Version())))
    ops = []
    for i in range(sg.OperatorsLength()):
        op = sg.Operators(i)
        if not 0 <= op.OpcodeIndex() < len(codes):
            raise _bad(f"operator {i} opcode index {op.OpcodeIndex()} out of range")
        used = [*op.InputsAsNumpy().tolist(), *op.OutputsAsNumpy().tolist()]
        if not all(0 <= j < len(tensors) for j in used) or op.OutputsLength() != 1:
            raise _bad(f"operator {i} refers to missing tensors {used}")
        ops.append(codes[op.OpcodeIndex()])
    ios = []
    for length, getter in ((sg.InputsLength(), sg.Inputs), (sg.OutputsLength(), sg.Outputs)):
        if length != 1 or not 0 <= getter(0) < len(tensors):
            raise _bad("the graph must have exactly one valid input and one output")
        ios.append(tensors[getter(0)])
    description = model.Description().decode("utf-8", "replace") if model.Description() else ""
    return ModelInfo(
        int(model.Version()), description, tuple(ops), tensors, ios[0], ios[1], len(data)
    )


def model_info(tflite_bytes: bytes) -> ModelInfo:
    """Parse and check a .tflite; raise ``RemoteProtocolError('bad_tflite', ...)`` if it is
    malformed or uses anything fedgate does not write."""
    data = bytes(tflite_bytes)
    if not 8 <= len(data) <= MAX_MODEL_BYTES:
        raise _bad(f"{len(data)} bytes is not a plausible model size")
    try:
        return _read(data)
    except RemoteProtocolError:
        raise
    except Exception as exc:  # the generated reader raises whatever a bad offset provokes
        raise _bad(f"unreadable flatbuffer ({type(exc).__name__}: {exc})") from exc
