"""The MQTT topic tree. This module is the only place that builds or parses topics.

```
fg/{fleet}/{task}/round                 retained  aggregator -> edges: round announcement
fg/{fleet}/{task}/model                 retained  aggregator -> edges: signed global model (or its chunk manifest)
fg/{fleet}/{task}/model/chunk/{chunk}   retained  aggregator -> edges: a large model's chunks, named by SHA-256
fg/{fleet}/{task}/deployment            retained  aggregator -> edges: version to run (inference)
fg/{fleet}/{task}/deployed              retained  aggregator -> plant systems: deployed .tflite
fg/{fleet}/{task}/state                 retained  aggregator -> operators: the task's state
fg/{fleet}/{task}/update/{device}       QoS 1     edge -> aggregator: updates, statistics, canary reports
fg/{fleet}/{task}/update/{device}/chunk QoS 1     edge -> aggregator: a large update's chunks
fg/{fleet}/{task}/secagg/{stage}/{device}         secure-aggregation stages
fg/{fleet}/{task}/metrics               retained  round summaries
fg/{fleet}/status/{device}              retained  birth / last will / gateway status
fg/{fleet}/telemetry/{device}                     inference outputs, alerts
```
The broker ACL is generated from :data:`ACL_RULES` (see ``broker_config``); a test proves the
two agree. Operators (``fedgate provision operator``: status, dashboard, plant systems that
subscribe to the deployed model) read what ``operator_read`` grants and write nothing. Names are restricted to ``[A-Za-z0-9_.-]`` so that no id can smuggle ``/``, ``+``
or ``#`` into a topic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from fedcore.errors import LocalProtocolError, RemoteProtocolError

ROOT = "fg"
_TASK_LEAVES = ("round", "model", "metrics", "deployment", "deployed", "state")
# Names are topic levels and folder names: no leading "." (so never "." or ".." or a
# hidden file), and \Z rather than $, which would also accept a trailing newline.
_NAME = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,63}\Z")
# The secure-aggregation stages (SecAgg+: advertise keys, share keys, masked input,
# unmasking). A fixed list, so the ACL names each one and no device can grow the broker's
# retained store under stage names of its own.
SECAGG_STAGES = ("keys", "shares", "masked", "unmask")
_CHUNK = re.compile(r"^[0-9a-f]{64}\Z")  # a chunk's SHA-256 in hex


class TopicKind(Enum):
    ROUND = "round"
    MODEL = "model"
    MODEL_CHUNK = "model_chunk"
    DEPLOYMENT = "deployment"
    DEPLOYED = "deployed"
    STATE = "state"
    UPDATE = "update"
    UPDATE_CHUNK = "update_chunk"
    SECAGG = "secagg"
    METRICS = "metrics"
    STATUS = "status"
    TELEMETRY = "telemetry"


@dataclass(frozen=True, slots=True)
class AclRule:
    """Who may do what on a topic pattern. ``{device}`` is the client's certificate CN."""

    kind: TopicKind
    pattern: str  # with {fleet}, {task}, {device}, {stage}, {chunk} placeholders
    device_write: bool
    device_read: bool
    aggregator_write: bool
    aggregator_read: bool
    operator_read: bool = False


ACL_RULES: tuple[AclRule, ...] = (
    AclRule(TopicKind.ROUND, "fg/{fleet}/{task}/round", False, True, True, True, True),
    AclRule(TopicKind.MODEL, "fg/{fleet}/{task}/model", False, True, True, True, True),
    AclRule(TopicKind.MODEL_CHUNK, "fg/{fleet}/{task}/model/chunk/{chunk}", False, True, True, True, True),
    AclRule(TopicKind.DEPLOYMENT, "fg/{fleet}/{task}/deployment", False, True, True, True, True),
    AclRule(TopicKind.DEPLOYED, "fg/{fleet}/{task}/deployed", False, False, True, True, True),
    AclRule(TopicKind.STATE, "fg/{fleet}/{task}/state", False, False, True, True, True),
    AclRule(TopicKind.UPDATE, "fg/{fleet}/{task}/update/{device}", True, False, False, True),
    AclRule(TopicKind.UPDATE_CHUNK, "fg/{fleet}/{task}/update/{device}/chunk", True, False, False, True),
    AclRule(TopicKind.SECAGG, "fg/{fleet}/{task}/secagg/{stage}/{device}", True, True, True, True),
    AclRule(TopicKind.METRICS, "fg/{fleet}/{task}/metrics", False, True, True, True, True),
    AclRule(TopicKind.STATUS, "fg/{fleet}/status/{device}", True, False, True, True, True),
    AclRule(TopicKind.TELEMETRY, "fg/{fleet}/telemetry/{device}", True, False, False, True, True),
)


# Fleet-level branches of the tree: a task of that name would put its model at
# fg/FLEET/status/model, the status topic of a device named "model".
RESERVED_TASKS = ("status", "telemetry")


def check_name(value: str, what: str) -> str:
    """Validate a fleet/task/device/stage name for use inside a topic (our own input)."""
    if not isinstance(value, str) or not _NAME.match(value):
        raise LocalProtocolError(
            f"{what} {value!r} must be 1-64 of [A-Za-z0-9_.-], not starting with '.'"
        )
    if what == "task" and value in RESERVED_TASKS:
        raise LocalProtocolError(f"task {value!r} is a branch of the topic tree (fg/FLEET/{value}/...): "
                                 "choose another name")
    return value


def _stage(stage: str) -> str:
    if stage not in SECAGG_STAGES:
        raise LocalProtocolError(f"stage {stage!r} is not one of {', '.join(SECAGG_STAGES)}")
    return stage


@dataclass(frozen=True, slots=True)
class ParsedTopic:
    kind: TopicKind
    fleet: str
    task: str | None
    device: str | None
    stage: str | None = None


@dataclass(frozen=True, slots=True)
class Topics:
    """Topic builder for one fleet and task."""

    fleet: str
    task: str

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        check_name(self.task, "task")

    @property
    def _base(self) -> str:
        return f"{ROOT}/{self.fleet}/{self.task}"

    def round(self) -> str:
        return f"{self._base}/round"

    def model(self) -> str:
        return f"{self._base}/model"

    def model_chunk(self, chunk_hash: bytes) -> str:
        """Where the chunk with this SHA-256 of a chunked model is retained."""
        if len(chunk_hash) != 32:
            raise LocalProtocolError(f"a chunk is named by its 32-byte SHA-256, not {len(chunk_hash)} bytes")
        return f"{self._base}/model/chunk/{chunk_hash.hex()}"

    def model_chunks_filter(self) -> str:
        return f"{self._base}/model/chunk/+"

    def metrics(self) -> str:
        return f"{self._base}/metrics"

    def deployment(self) -> str:
        return f"{self._base}/deployment"

    def deployed(self) -> str:
        return f"{self._base}/deployed"

    def state(self) -> str:
        return f"{self._base}/state"

    def task_filter(self, leaf: str) -> str:
        """``fg/{fleet}/+/{leaf}``: one retained topic of every task of the fleet."""
        if leaf not in _TASK_LEAVES:
            raise LocalProtocolError(f"{leaf!r} is not a per-task topic ({', '.join(_TASK_LEAVES)})")
        return f"{ROOT}/{self.fleet}/+/{leaf}"

    def update(self, device: str) -> str:
        return f"{self._base}/update/{check_name(device, 'device')}"

    def updates_filter(self) -> str:
        return f"{self._base}/update/+"

    def update_chunk(self, device: str) -> str:
        return f"{self._base}/update/{check_name(device, 'device')}/chunk"

    def update_chunks_filter(self) -> str:
        return f"{self._base}/update/+/chunk"

    def secagg(self, stage: str, device: str) -> str:
        return f"{self._base}/secagg/{_stage(stage)}/{check_name(device, 'device')}"

    def secagg_filter(self, stage: str) -> str:
        return f"{self._base}/secagg/{_stage(stage)}/+"

    def status(self, device: str) -> str:
        return f"{ROOT}/{self.fleet}/status/{check_name(device, 'device')}"

    def status_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/status/+"

    def telemetry(self, device: str) -> str:
        return f"{ROOT}/{self.fleet}/telemetry/{check_name(device, 'device')}"

    def telemetry_filter(self) -> str:
        return f"{ROOT}/{self.fleet}/telemetry/+"


def parse_topic(topic: str) -> ParsedTopic:
    """Parse a received topic; a topic outside the tree is the peer's (or broker's) fault."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT or not all(_NAME.match(p) for p in parts[1:]):
        raise RemoteProtocolError("bad_topic", f"not a fedgate topic: {topic!r}")
    fleet = parts[1]
    if len(parts) == 4 and parts[2] in ("status", "telemetry"):
        return ParsedTopic(TopicKind(parts[2]), fleet, None, parts[3])
    if len(parts) == 4 and parts[3] in _TASK_LEAVES:
        return ParsedTopic(TopicKind(parts[3]), fleet, parts[2], None)
    if len(parts) == 5 and parts[3] == "update":
        return ParsedTopic(TopicKind.UPDATE, fleet, parts[2], parts[4])
    if len(parts) == 6 and parts[3] == "model" and parts[4] == "chunk" and _CHUNK.match(parts[5]):
        return ParsedTopic(TopicKind.MODEL_CHUNK, fleet, parts[2], None)
    if len(parts) == 6 and parts[3] == "update" and parts[5] == "chunk":
        return ParsedTopic(TopicKind.UPDATE_CHUNK, fleet, parts[2], parts[4])
    if len(parts) == 6 and parts[3] == "secagg" and parts[4] in SECAGG_STAGES:
        return ParsedTopic(TopicKind.SECAGG, fleet, parts[2], parts[5], stage=parts[4])
    raise RemoteProtocolError("bad_topic", f"not a fedgate topic: {topic!r}")
