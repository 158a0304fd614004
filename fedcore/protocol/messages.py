"""Message bodies: immutable values that travel inside the :class:`~fedcore.protocol.codec.Envelope`.

Each body kind has one Struct. The envelope's ``kind`` selects the body type, so a body is
always decoded against a known schema (msgspec validates types; ``codec`` adds bounds).

Every Struct travels as a msgpack *array* (``array_like``): field names are not repeated in
every message, which keeps a round's fixed overhead to a few dozen bytes. Fields are
therefore positional: a new field goes at the end, with a default, so older peers' messages
still decode; anything else needs a new protocol version.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

from fedcore.protocol.tensors import Tensor


class Kind(StrEnum):
    ROUND = "round"
    UPDATE = "update"
    MODEL = "model"
    METRICS = "metrics"
    STATUS = "status"
    TELEMETRY = "telemetry"
    SECAGG = "secagg"


class ModelSpec(msgspec.Struct, frozen=True, array_like=True):
    """Enough to rebuild a model: architecture, task and the feature scaling it expects."""

    kind: str  # "mlp" | "autoencoder"
    layer_sizes: tuple[int, ...]
    activation: str = "relu"
    task: str = "regression"  # "regression" | "classification" | "anomaly"
    features: tuple[str, ...] = ()
    target: str = ""


class TrainConfig(msgspec.Struct, frozen=True, array_like=True):
    local_epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 0.01
    optimizer: str = "sgd"  # "sgd" | "adam"
    max_steps: int = 0  # 0 = no cap; caps local SGD steps per round
    # record-level DP (DP-SGD, fedcore/privacy/dpsgd.py); appended last: array_like is positional
    dp_clip: float = 0.0  # per-example gradient clip norm; 0 = off
    dp_noise: float = 0.0  # noise multiplier sigma: N(0, (sigma*dp_clip)^2) on each summed batch gradient
    qat: bool = False  # quantization-aware training: int8 fake-quant forward, STE gradients


class PipelineConfig(msgspec.Struct, frozen=True, array_like=True):
    """What the gateway does to its delta before sending (see fedcore.compression/privacy)."""

    clip_norm: float = 0.0  # 0 = no clipping
    noise_multiplier: float = 0.0  # Gaussian sigma = noise_multiplier * clip_norm
    compression: tuple[str, ...] = ()  # e.g. ("topk:0.01", "int8", "zstd")
    adaptive_clip_quantile: float = 0.0  # 0 = fixed clipping


class RoundAnnouncement(msgspec.Struct, frozen=True, array_like=True):
    round: int
    model_version: int
    deadline: float  # unix time by which updates must arrive
    train: TrainConfig = TrainConfig()
    pipeline: PipelineConfig = PipelineConfig()
    selected: tuple[str, ...] = ()  # empty = every gateway may take part


class EncodedDelta(msgspec.Struct, frozen=True, array_like=True):
    """A model delta after the gateway's pipeline; ``stages`` say how to undo it.

    ``stages == ()`` means raw: ``parts`` holds one float tensor per layer, in model order.
    """

    stages: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    parts: tuple[Tensor, ...]


class ModelUpdate(msgspec.Struct, frozen=True, array_like=True):
    round: int
    base_version: int
    num_samples: int
    delta: EncodedDelta
    train_loss: float = 0.0
    clipped: bool = False  # whether L2 clipping bit (for adaptive clipping)
    stats: dict[str, float] = {}


class GlobalModel(msgspec.Struct, frozen=True, array_like=True):
    version: int
    round: int
    parent_hash: bytes
    spec: ModelSpec
    tensors: tuple[Tensor, ...]
    encoding: str = "fp32"  # "fp32" | "int8" (downlink quantization)
    scales: tuple[float, ...] = ()  # per-tensor scales for int8 downlink


class RoundSummary(msgspec.Struct, frozen=True, array_like=True):
    round: int
    model_version: int
    participants: tuple[str, ...]
    num_samples: int
    metrics: dict[str, float] = {}
    bytes_up: int = 0
    bytes_down: int = 0
    wall_s: float = 0.0
    rejected: dict[str, int] = {}
    epsilon: dict[str, float] = {}
    alerts: tuple[str, ...] = ()


class Status(msgspec.Struct, frozen=True, array_like=True):
    state: str  # "online" | "offline"
    software: str = ""
    model_version: int = -1
    detail: dict[str, str] = {}


class Telemetry(msgspec.Struct, frozen=True, array_like=True):
    model_version: int
    values: dict[str, float] = {}
    alerts: tuple[str, ...] = ()


class SecAggMessage(msgspec.Struct, frozen=True, array_like=True):
    stage: str
    payload: bytes


BODY_TYPES: dict[Kind, type[msgspec.Struct]] = {
    Kind.ROUND: RoundAnnouncement,
    Kind.UPDATE: ModelUpdate,
    Kind.MODEL: GlobalModel,
    Kind.METRICS: RoundSummary,
    Kind.STATUS: Status,
    Kind.TELEMETRY: Telemetry,
    Kind.SECAGG: SecAggMessage,
}
