"""Which model a gateway runs for inference: it follows the aggregator's deployment records.

Theory of operation
-------------------
Pure. Training always works on the newest global model; what runs in LiteRT is what the
fleet's signed :class:`~fedcore.protocol.messages.Deployment` record says:

- ``mode == "latest"`` (the default, and before any record): the newest global model.
- ``mode == "version"``: ``version``, whose weights travel in the record (an operator's
  ``fedgate model deploy`` or ``rollback``, or a promoted candidate).
- ``mode == "canary"``: ``version`` - except on the gateways listed in ``canary``, which
  run ``candidate`` and answer with a :class:`~fedcore.protocol.messages.CanaryReport`
  (``EvaluateCanary``): both models on the same local holdout rows.

Records are ordered by (lineage, sequence): the sequence grows by one per record within a
lineage and starts again in a new one. A record not after the one applied is a retained
redelivery (the same: nothing to do) or a replay (older: refused), so an old deployment
cannot be brought back by replaying its message. The position survives restarts (the
runtime persists it), and the record at that position is applied again once after a
restart - a pinned version, a roll-back or a canary trial holds across a gateway reboot. A record of an older lineage than the gateway follows is refused; of
a newer one, it is applied (the participant follows that lineage as its model arrives).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedcore.errors import RemoteProtocolError
from fedcore.learning.params import Params
from fedcore.protocol.lineage import is_newer
from fedcore.protocol.messages import Deployment
from fedcore.protocol.tensors import decode_tensors

MODES = ("latest", "version", "canary")


@dataclass(frozen=True, slots=True)
class Running:
    """The model to run: ``weights`` None means the newest global model (mode latest)."""

    version: int
    weights: Params | None
    role: str  # "latest" | "deployed" | "candidate"


@dataclass(frozen=True, slots=True)
class RunModel:
    running: Running


@dataclass(frozen=True, slots=True)
class EvaluateCanary:
    sequence: int
    candidate: int
    candidate_weights: Params
    incumbent: int
    incumbent_weights: Params


@dataclass(frozen=True, slots=True)
class DeploymentRefused:
    sequence: int
    reason: str


DeploymentAction = RunModel | EvaluateCanary | DeploymentRefused


class DeploymentFollower:
    """Pure deployment logic of one gateway. See the module docstring."""

    def __init__(self, device: str, sequence: int = -1, lineage: str = "",
                 max_elements: int = 16 * 1024 * 1024) -> None:
        self.device = device
        self.sequence = sequence
        self.lineage = lineage  # of the record applied
        self.max_elements = max_elements
        self.running = Running(-1, None, "latest")
        self.mode = "latest"
        self.applied = False  # a record was applied by this process (the position may be older)

    def on_record(self, record: Deployment, lineage: str) -> list[DeploymentAction]:
        """Apply ``record``; ``lineage``: the one the gateway's participant follows."""
        if record.lineage != lineage and not is_newer(record.lineage, lineage):
            return [DeploymentRefused(record.sequence, "old_lineage")]
        if record.lineage == self.lineage or not is_newer(record.lineage, self.lineage):
            if record.lineage != self.lineage:
                return [DeploymentRefused(record.sequence, "old_lineage")]
            if record.sequence == self.sequence and self.applied:
                return []  # the retained record again
            if record.sequence < self.sequence:
                return [DeploymentRefused(record.sequence, "replayed")]
        if record.mode not in MODES:
            return [DeploymentRefused(record.sequence, "bad_mode")]
        try:
            actions = self._apply(record)
        except RemoteProtocolError as exc:
            return [DeploymentRefused(record.sequence, exc.reason)]
        self.sequence, self.lineage = record.sequence, record.lineage
        self.mode = record.mode
        self.applied = True
        return actions

    def _apply(self, record: Deployment) -> list[DeploymentAction]:
        if record.mode == "latest":
            self.running = Running(-1, None, "latest")
            return [RunModel(self.running)]
        deployed = self._weights(record.tensors, "tensors")
        if record.mode == "canary" and self.device in record.canary:
            candidate = self._weights(record.candidate_tensors, "candidate_tensors")
            self.running = Running(record.candidate, candidate, "candidate")
            return [RunModel(self.running),
                    EvaluateCanary(record.sequence, record.candidate, candidate,
                                   record.version, deployed)]
        self.running = Running(record.version, deployed, "deployed")
        return [RunModel(self.running)]

    def _weights(self, parts: tuple, what: str) -> Params:
        if not parts:
            raise RemoteProtocolError("bad_deployment", f"{what} missing")
        return [np.asarray(a, np.float32).copy() for a in decode_tensors(parts, self.max_elements)]
