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
    STATS = "stats"  # gateway -> aggregator: the federated statistics step of a lineage
    CANARY = "canary"  # gateway -> aggregator: a canary's evaluation of a candidate model
    DEPLOYMENT = "deployment"  # aggregator -> gateways: which version runs for inference
    DEPLOYED = "deployed"  # aggregator -> plant systems: the deployed model as .tflite
    STATE = "state"  # aggregator -> operators: the task's state (status, dashboard)
    MANIFEST = "manifest"  # either way: a message too large for one packet, as chunks


class ModelSpec(msgspec.Struct, frozen=True, array_like=True):
    """Enough to rebuild a model: architecture, task and the feature scaling it expects."""

    kind: str  # "mlp" | "autoencoder"
    layer_sizes: tuple[int, ...]
    activation: str = "relu"
    task: str = "regression"  # "regression" | "classification" | "anomaly"
    features: tuple[str, ...] = ()
    target: str = ""
    # The fleet scaler (federated statistics step, docs/decisions.md): gateways standardise
    # raw rows with it; empty when the rows arrive already scaled (the demo's data sets).
    feature_mean: tuple[float, ...] = ()
    feature_std: tuple[float, ...] = ()
    target_mean: float = 0.0
    target_std: float = 1.0

    @property
    def has_scaler(self) -> bool:
        return bool(self.feature_mean)


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
    lineage: str = ""  # the model lineage this round belongs to (fedcore.protocol.lineage)
    # "train": send a ModelUpdate; "statistics": send DataStats (the lineage's first step);
    # "wait": no round runs until ``deadline`` (the schedule), ``round`` is the next one
    purpose: str = "train"
    # "sync": train on ``model_version`` for this round; "buffered": train on the newest model
    # held, whenever there is one not yet trained on, and send whenever the link is up
    # (aggregator.buffered); the aggregator folds updates up to its max_staleness
    mode: str = "sync"


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
    lineage: str = ""


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
    lineage: str = ""
    # each participant's own evaluation of the model it trained from: device -> metrics
    per_gateway: dict[str, dict[str, float]] = {}


class Status(msgspec.Struct, frozen=True, array_like=True):
    """A gateway's retained status (birth, last will, and refreshed on every change)."""

    state: str  # "online" | "offline"
    software: str = ""
    model_version: int = -1  # the version its inference runs (the deployed one)
    detail: dict[str, str] = {}
    lineage: str = ""
    trained_version: int = -1  # the global model it trains from
    since: float = 0.0  # unix time the connection state began
    # "waiting_for_data" | "ready" | "training" | "incompatible" | "refusing" | ""
    activity: str = ""
    activity_detail: str = ""  # e.g. "62 of 500 rows"
    rows: int = 0  # rows held for training now (training + holdout)
    rows_new: int = 0  # of those, rows no round has trained on yet
    rows_needed: int = 0  # training rows needed before it takes part
    last_round: int = -1  # last round it sent an update for
    last_rows: int = 0  # training rows of that update
    last_eval: dict[str, float] = {}  # its holdout evaluation of its training model
    epsilon: float = 0.0  # reserved for the gateway's own privacy ledger (the aggregator's is in TaskState)
    deployment: int = -1  # sequence of the deployment record it follows
    rejected: dict[str, int] = {}  # messages it refused, by reason


class Telemetry(msgspec.Struct, frozen=True, array_like=True):
    model_version: int
    values: dict[str, float] = {}
    alerts: tuple[str, ...] = ()


class SecAggMessage(msgspec.Struct, frozen=True, array_like=True):
    stage: str
    payload: bytes


class DataStats(msgspec.Struct, frozen=True, array_like=True):
    """A gateway's answer to a statistics round: count, sums and centred sums of squares
    (``sum((x - mean)^2)`` about the gateway's own mean) of its raw training rows per column
    (the features, then the regression target). No row leaves."""

    lineage: str
    columns: tuple[str, ...]
    count: int
    sums: tuple[float, ...]
    m2: tuple[float, ...]


class CanaryReport(msgspec.Struct, frozen=True, array_like=True):
    """A canary gateway's evaluation of a candidate and of the incumbent on the same holdout."""

    sequence: int  # the deployment record that asked for it
    candidate: int
    incumbent: int
    candidate_metrics: dict[str, float] = {}
    incumbent_metrics: dict[str, float] = {}
    num_rows: int = 0


class Deployment(msgspec.Struct, frozen=True, array_like=True):
    """Which model version the gateways run for inference (retained, signed).

    ``mode``: "latest" - run the newest global model of the lineage; "version" - run
    ``version`` (its weights travel in ``tensors``); "canary" - run ``version`` except the
    gateways in ``canary``, which run ``candidate`` and report a :class:`CanaryReport`.
    ``sequence`` grows by one with every record, so a replayed old record is refused."""

    sequence: int
    lineage: str
    mode: str
    version: int
    tensors: tuple[Tensor, ...] = ()
    candidate: int = -1
    candidate_tensors: tuple[Tensor, ...] = ()
    canary: tuple[str, ...] = ()
    reason: str = ""
    timestamp: float = 0.0


class DeployedModel(msgspec.Struct, frozen=True, array_like=True):
    """The deployed model for other plant systems (retained on ``.../deployed``, signed).

    ``tflite``: a float32 .tflite that takes the raw feature values in ``spec.features``
    order and returns the target in its own unit (the fleet scaler is folded into the first
    and last layers). docs/protocol.md shows how to decode and verify it without fedgate."""

    sequence: int
    lineage: str
    version: int
    spec: ModelSpec
    tflite: bytes
    sha256: bytes = b""  # of ``tflite``


class RoundPoint(msgspec.Struct, frozen=True, array_like=True):
    """One committed round in the task state's history (the dashboard's charts)."""

    round: int
    model_version: int
    participants: int
    rows: int
    # the fleet metric: sample-weighted holdout evaluations, by the round's participants, of
    # the model they trained from (version model_version - 1); NaN if none
    metric: float
    wall_s: float
    time: float


class TaskState(msgspec.Struct, frozen=True, array_like=True):
    """The aggregator's view of one task (retained on ``.../state``, for operators)."""

    lineage: str
    phase: str  # "statistics" | "collecting" | "waiting" | "finished"
    round: int
    model_version: int
    rounds_planned: int = 0  # 0 = runs until stopped
    waiting_for: str = ""  # why no round runs now (schedule, new rows, quorum)
    next_round_at: float = 0.0
    online: tuple[str, ...] = ()
    quarantined: tuple[str, ...] = ()
    budget_spent: tuple[str, ...] = ()
    deployed_version: int = -1
    deployment_mode: str = ""
    candidate: int = -1
    canary: tuple[str, ...] = ()
    rejected: dict[str, int] = {}
    epsilon: dict[str, float] = {}
    metric: str = ""  # name of the fleet metric in history
    metric_higher_is_better: bool = False
    history: tuple[RoundPoint, ...] = ()
    updated_at: float = 0.0


class ChunkManifest(msgspec.Struct, frozen=True, array_like=True):
    """A message sent as content-addressed chunks (``fedcore.protocol.chunks``).

    The chunks are the message's bytes cut every ``chunk_size`` bytes; ``chunks`` holds
    the SHA-256 of each, in order, and ``sha256`` the whole message's. The manifest travels
    signed in its own envelope; the message it describes is a complete signed envelope too.
    """

    kind: str  # the kind of the message carried (what the receiver expects on the topic)
    size: int
    chunk_size: int
    chunks: tuple[bytes, ...]
    sha256: bytes


BODY_TYPES: dict[Kind, type[msgspec.Struct]] = {
    Kind.ROUND: RoundAnnouncement,
    Kind.UPDATE: ModelUpdate,
    Kind.MODEL: GlobalModel,
    Kind.METRICS: RoundSummary,
    Kind.STATUS: Status,
    Kind.TELEMETRY: Telemetry,
    Kind.SECAGG: SecAggMessage,
    Kind.STATS: DataStats,
    Kind.CANARY: CanaryReport,
    Kind.DEPLOYMENT: Deployment,
    Kind.DEPLOYED: DeployedModel,
    Kind.STATE: TaskState,
    Kind.MANIFEST: ChunkManifest,
}
