"""Buffered asynchronous rounds (FedBuff-style): the pure rules, apart from the round machine.

Theory of operation
-------------------
In ``[rounds] mode = "buffered"`` a "round" is one buffer of updates, not a synchronous
cohort. Gateways train on the newest model they hold whenever they can and send the result
whenever their link is up; the round machine (``aggregator.rounds``) folds each update into
the open buffer and publishes a new model version once the buffer holds ``buffer_size`` (K)
updates. An update may be built on an older model version than the current one: its
*staleness* is ``current version - base version``.

Rules (each a plain function below, called by the round machine):

1. **Admission** (``refusal``): an update built on a version more than ``max_staleness``
   behind the current one is refused as ``too_stale``; one that names a version the
   aggregator has not published yet as ``future_base``; one that names a round not yet
   announced as ``wrong_round``. Everything else that ``aggregator.rounds`` checks (message
   id and per-buffer duplicates, quarantine, privacy budget, decoding, shapes, norm bound)
   applies unchanged. A gateway holds at most one place in a buffer: its second update
   while the first is in the open buffer (one trained before it went away, one after it
   came back) goes into the next buffer, counted with the staleness it will have there;
   a third, or one that would be too stale there, is refused as ``duplicate_device``.
2. **Weight** (``staleness_weight``): an update with staleness ``s`` has its delta scaled by
   ``(1 + s) ** -staleness_exponent`` before fusion. The default exponent 0.5 is FedBuff's
   ``1/sqrt(1 + s)`` (Nguyen et al., 2022); 0 counts stale work in full. The discount is not
   renormalised away: a buffer of stale updates moves the model less than a fresh one.
3. **Flush** (``should_flush``): the buffer is fused into a new version as soon as it holds K
   updates, or earlier when every gateway that could still add to it has (so a fleet smaller
   than K, or one mostly offline, does not wait for nobody), provided it holds at least
   ``min_participants``. At the deadline the round machine's quorum rule applies as in a
   synchronous round (flush with ``min_participants``, otherwise extend).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedcore.learning.params import Params

MODES = ("sync", "buffered")


@dataclass(frozen=True, slots=True)
class BufferedConfig:
    buffer_size: int = 10  # K: updates fused into one new model version
    max_staleness: int = 5  # versions an update's base may lag behind the current model
    staleness_exponent: float = 0.5  # weight (1 + staleness) ** -exponent; 0 = no discount
    min_interval_s: float = 5.0  # a buffer short of K waits this long after the last version


def staleness_weight(staleness: int, exponent: float) -> float:
    """FedBuff's polynomial discount of an update ``staleness`` versions old."""
    return float((1.0 + max(0, staleness)) ** -exponent)


def refusal(config: BufferedConfig, update_round: int, base_version: int,
            current_round: int, current_version: int) -> tuple[str, str] | None:
    """Why an update cannot go into the open buffer, as (reason, detail); None if it can."""
    if update_round > current_round:
        return "wrong_round", f"round {update_round} > {current_round}"
    if base_version > current_version:
        return "future_base", f"built on version {base_version}, current {current_version}"
    staleness = current_version - base_version
    if staleness > config.max_staleness:
        return "too_stale", (f"built on version {base_version}, current {current_version}: "
                             f"staleness {staleness} > max_staleness {config.max_staleness}")
    return None


def should_flush(config: BufferedConfig, buffered: int, quorum: int, nobody_else: bool,
                 open_s: float = math.inf) -> bool:
    """Rule 3: K updates; or every gateway that could add one has, with at least a quorum,
    once the buffer has been open ``min_interval_s``. (Without that floor a lone gateway
    makes a version of its own update, trains on it at once, and so on, as fast as it can
    train, on the same rows: CPU, uplink and privacy budget spent for nothing.)"""
    if buffered < quorum:
        return False
    return buffered >= config.buffer_size or (nobody_else and open_s >= config.min_interval_s)


def discount(delta: Params, weight: float) -> Params:
    """The delta scaled by its staleness weight (a fresh update, weight 1, is returned as is)."""
    if weight == 1.0:
        return delta
    return [np.asarray(d * np.float32(weight), np.float32) for d in delta]
