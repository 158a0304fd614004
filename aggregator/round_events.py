"""Events the aggregator's round state machine takes and actions it returns.

Events carry ``now`` (unix seconds) and are past-tense facts; actions are imperative
instructions the runtime carries out. See ``aggregator/rounds.py`` for the rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.learning.params import Params
from fedcore.protocol.messages import GlobalModel, ModelUpdate, RoundAnnouncement, RoundSummary

# ---- events -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Started:
    now: float


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class DeviceOnline:
    now: float
    device: str


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
class BrokerSessionLost:
    """The broker came back without our session (restarted without persistence): its
    retained model and round may be gone, and so may updates that were in flight."""

    now: float


Event = Started | Tick | DeviceOnline | DeviceOffline | UpdateReceived | BrokerSessionLost

# ---- actions ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishRound:
    announcement: RoundAnnouncement


@dataclass(frozen=True, slots=True)
class PublishModel:
    model: GlobalModel


@dataclass(frozen=True, slots=True)
class PublishMetrics:
    summary: RoundSummary


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


Action = (
    PublishRound | PublishModel | PublishMetrics | SaveCheckpoint | UpdateRejected
    | UpdateAccepted | QuorumMissed | GatewayQuarantined | GatewayReleased | RunFinished
)


@dataclass(frozen=True)
class Checkpoint:
    """Everything a restarted aggregator needs; ``weights`` plus JSON-able ``meta``."""

    weights: Params
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
