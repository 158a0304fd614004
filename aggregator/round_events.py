"""Events the aggregator's round state machine takes and actions it returns.

Events carry ``now`` (unix seconds) and are past-tense facts; actions are imperative
instructions the runtime carries out. See ``aggregator/rounds.py`` for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.learning.params import Params
from fedcore.protocol.messages import (
    DataStats,
    GlobalModel,
    ModelSpec,
    ModelUpdate,
    RoundAnnouncement,
    RoundSummary,
)

# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    now: float
    entropy: bytes = b""  # random bytes for a new lineage's id (the machine has no OS randomness)


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    """A gateway's status says it is online. ``ready``: it has enough rows and a usable
    model (status activity other than waiting_for_data / incompatible); only ready
    gateways are waited for. ``rows_new``: its training rows no round has used yet."""

    now: float
    device: str
    ready: bool = True
    rows_new: int = 0


@dataclass(frozen=True, slots=True)
class DeviceOffline:
    now: float
    device: str


@dataclass(frozen=True, slots=True)
class UpdateReceived:
    now: float
    device: str
    message_id: str
    update: ModelUpdate
    wire_bytes: int = 0


@dataclass(frozen=True, slots=True)
class StatsReceived:
    now: float
    device: str
    stats: DataStats


@dataclass(frozen=True, slots=True)
class BrokerSessionLost:
    """The broker came back without our session (restarted without persistence): its
    retained model and round may be gone, and so may updates that were in flight."""

    now: float


Event = (Started | Tick | DeviceOnline | DeviceOffline | UpdateReceived | StatsReceived
         | BrokerSessionLost)

# ---- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishRound:
    announcement: RoundAnnouncement


@dataclass(frozen=True, slots=True)
class PublishModel:
    model: GlobalModel


@dataclass(frozen=True, slots=True)
class ModelCommitted:
    """A round made a new version (not a re-publication of one): deploy and audit it."""

    version: int


@dataclass(frozen=True, slots=True)
class PublishMetrics:
    summary: RoundSummary
    again: bool = False  # the last round's summary once more after a restart (it may not have gone out)


@dataclass(frozen=True, slots=True)
class SaveCheckpoint:
    checkpoint: Checkpoint


@dataclass(frozen=True, slots=True)
class UpdateRejected:
    device: str
    round: int
    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class UpdateAccepted:
    device: str
    round: int
    num_samples: int
    staleness: int = 0  # buffered mode: versions between its base and the current model


@dataclass(frozen=True, slots=True)
class QuorumMissed:
    round: int
    received: int
    needed: int


@dataclass(frozen=True, slots=True)
class GatewayQuarantined:
    device: str
    round: int
    score: float


@dataclass(frozen=True, slots=True)
class GatewayReleased:
    device: str
    round: int


@dataclass(frozen=True, slots=True)
class RunFinished:
    round: int
    model_version: int


@dataclass(frozen=True, slots=True)
class RunContinued:
    """A finished run was restarted with more rounds (or ``rounds = 0``)."""

    round: int
    model_version: int


@dataclass(frozen=True, slots=True)
class LineageStarted:
    lineage: str
    statistics: bool  # True: a statistics round comes first


@dataclass(frozen=True, slots=True)
class ScalerFitted:
    """The statistics round closed: the fleet scaler from ``rows`` rows of ``devices``."""

    devices: tuple[str, ...]
    rows: int
    spec: ModelSpec


@dataclass(frozen=True, slots=True)
class RoundWaiting:
    """No round starts now; ``reason`` says why (schedule, new rows)."""

    round: int
    reason: str


Action = (
    PublishRound | PublishModel | ModelCommitted | PublishMetrics | SaveCheckpoint | UpdateRejected
    | UpdateAccepted | QuorumMissed | GatewayQuarantined | GatewayReleased | RunFinished
    | RunContinued | LineageStarted | ScalerFitted | RoundWaiting
)


@dataclass(frozen=True)
class Checkpoint:
    """Everything a restarted aggregator needs; ``weights`` plus JSON-able ``meta``."""

    weights: Params
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
