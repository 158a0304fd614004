"""What the aggregator publishes on the model topic, and what the gateways then hold.

Theory of operation
-------------------
The aggregator keeps the float *master*; the downlink mode (``[rounds] downlink``) decides
what travels (encodings: :mod:`fedcore.compression.downlink`):

- ``"fp32"``: the master, exactly. Gateways hold the master.
- ``"int8"``: int8 codes of the master with one scale per tensor (~4x fewer bytes).
  Gateways hold ``decode(encode(master))``; rounding is deterministic, so this module
  computes that same array (``held``). Their deltas are relative to ``held``.
- ``"delta"``: version ``v`` travels as int8 codes of ``master_v - held_{v-1}``; a gateway
  that holds version ``v - 1`` adds it and holds ``held_v``. Because the reference is what
  gateways hold (not the previous master), each message also carries the last rounding
  error: the gap ``master - held`` stays within one step of the *delta's* scale and never
  accumulates. Every ``full_every`` versions (and for version 0) the message is a full int8
  model instead, a safety net for a gateway that missed a message unnoticed.

A delta is useless to a gateway that does not hold ``v - 1`` (it just started, or it was
offline). MQTT has no request, so the aggregator tracks who can apply the next delta:
``synced`` holds the gateways believed to hold the current version (online without a break
since they last received a model they could apply; QoS 1 delivers the model topic in
order). When a gateway comes online while the retained message is a delta, the aggregator
republishes the *same* version as fp32 of ``held`` (a re-sync): the newcomer installs it,
and gateways that already hold that version see bitwise-equal weights and take the re-sync
message as their chain head, so the parent-hash chain (hash of the body as sent) continues
for everyone. A commit is a delta only if every online gateway is in ``synced``.

Pure: no clock, rng or I/O. ``held`` must be checkpointed in delta mode (the reference
cannot be recomputed from the master); see :meth:`Downlink.to_arrays`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from fedcore.compression.downlink import MODES, decode_model, encode_model
from fedcore.learning.params import Params, Shapes, shapes_of
from fedcore.protocol.messages import GlobalModel, ModelSpec

# Checkpoint arrays are reloaded only under the "opt_" prefix (aggregator.checkpoints);
# the server optimizer reads "opt_m_*"/"opt_v_*", so this name does not collide.
_ARRAY_PREFIX = "opt_downlink_held_"


@dataclass
class Downlink:
    mode: str = "fp32"
    full_every: int = 10  # delta mode: a full int8 model every N versions (0 = only when needed)
    held: Params = field(default_factory=list)  # what gateways reconstruct from the last message
    synced: set[str] = field(default_factory=set)
    current_is_delta: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown downlink mode {self.mode!r}; use one of {MODES}")

    def message(self, master: Params, version: int, parent_hash: bytes, spec: ModelSpec,
                online: Iterable[str], lineage: str = "") -> GlobalModel:
        """The model message for a newly committed ``version``; updates ``held``/``synced``."""
        online = set(online)
        shapes = shapes_of(master)
        use_delta = (
            self.mode == "delta" and version > 0 and len(self.held) == len(master)
            and not (self.full_every > 0 and version % self.full_every == 0)
            and online <= self.synced
        )
        if use_delta:
            enc = encode_model(master, "delta", self.held)
            self.held = decode_model("delta", enc.tensors, enc.scales, shapes, self.held)
            self.synced &= online
        else:
            enc = encode_model(master, "fp32" if self.mode == "fp32" else "int8")
            self.held = decode_model(enc.encoding, enc.tensors, enc.scales, shapes)
            self.synced = online
        self.current_is_delta = use_delta
        return GlobalModel(version=version, round=version, parent_hash=parent_hash, spec=spec,
                           tensors=enc.tensors, encoding=enc.encoding, scales=enc.scales,
                           lineage=lineage)

    def resync(self, version: int, parent_hash: bytes, spec: ModelSpec, lineage: str = "") -> GlobalModel:
        """The current version as fp32 of ``held``: what a gateway that cannot apply the
        retained delta installs (decodes bitwise-equal to the delta chain's result)."""
        enc = encode_model(self.held, "fp32")
        self.current_is_delta = False
        return GlobalModel(version=version, round=version, parent_hash=parent_hash, spec=spec,
                           tensors=enc.tensors, encoding=enc.encoding, scales=enc.scales,
                           lineage=lineage)

    def came_online(self, device: str, online: Iterable[str]) -> bool:
        """A gateway (re)connected: True if the current version must be re-sent in full."""
        if not self.current_is_delta:
            self.synced.add(device)  # the retained message is full: it can start from it
            return False
        self.synced = set(online) | {device}
        return True

    def went_offline(self, device: str) -> None:
        self.synced.discard(device)

    # ---- checkpoints -----------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        if self.mode != "delta":
            return {}  # fp32/int8: held is a function of the master
        return {f"{_ARRAY_PREFIX}{i}": h for i, h in enumerate(self.held)}

    def restore_held(self, arrays: dict[str, np.ndarray], shapes: Shapes) -> bool:
        """Reload ``held`` from checkpoint arrays; False when they are missing or mismatched."""
        items = sorted((int(k[len(_ARRAY_PREFIX):]), v) for k, v in arrays.items()
                       if k.startswith(_ARRAY_PREFIX))
        held = [np.asarray(v, np.float32) for _, v in items]
        if not held or shapes_of(held) != tuple(shapes):
            return False
        self.held = held
        return True
