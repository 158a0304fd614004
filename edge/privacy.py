"""A gateway's own privacy policy (``[privacy]``) and its own epsilon ledger. Pure.

Each gateway adds its DP noise itself, at the level and multiplier the round announcement
names. Without a policy it trusts those figures: an aggregator that announced noise 0
would get clear updates. With one, the gateway checks every announcement *before* training
(``refusal``) and sits the round out with a reason that names the announced figure and the
config key it breaks; it keeps its own ledger of the updates it sent under DP (``charge``; epsilon by the
aggregator's accountant, in plain Python: ``fedcore.privacy.accountant``) and refuses a round
whose update would take it over ``max_epsilon``. No announcement can lower any of this.

The ledger is never reset by a new lineage: a lineage is the aggregator's to start, and the
data it protects is the same; only an operator (removing ``state_dir/privacy-ledger.json``)
resets it. See docs/privacy.md.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedcore.errors import LocalProtocolError
from fedcore.privacy.accountant import epsilon_of
from fedcore.privacy.dpsgd import dp_steps, sampling_rate
from fedcore.protocol.messages import RoundAnnouncement

LEVELS = ("none", "update", "record")
FILE = "privacy-ledger.json"
LEDGER_VERSION = 1


@dataclass(frozen=True, slots=True)
class PrivacyPolicy:
    """``[privacy]`` of the edge config; the defaults keep a gateway without a policy."""

    require: str = "none"  # DP level required: "none", "update" (pipeline) or "record" (DP-SGD)
    min_noise_multiplier: float = 0.0  # of that level
    max_epsilon: float = 0.0  # this gateway's own budget; 0 = none
    delta: float = 1e-5

    @property
    def active(self) -> bool:
        return self.require != "none"


def refusal(policy: PrivacyPolicy, ann: RoundAnnouncement) -> str:
    """Why this announcement breaks the policy ("" if it does not): the reason a gateway
    sits the round out with, naming what was announced and the key it falls short of."""
    if policy.require == "update":
        z, clip, what = ann.pipeline.noise_multiplier, ann.pipeline.clip_norm, "pipeline"
        clip_key = "clip_norm"
    elif policy.require == "record":
        z, clip, what = ann.train.dp_noise, ann.train.dp_clip, "train"
        clip_key = "dp_clip"
    else:
        return ""
    noise_key = "noise_multiplier" if what == "pipeline" else "dp_noise"
    if not z > 0 or not clip > 0:
        return (f"privacy_policy: round announces {what}.{noise_key}={z:g} {what}.{clip_key}={clip:g}, "
                f"[privacy] require = \"{policy.require}\" needs {policy.require}-level DP "
                f"(noise and clipping > 0)")
    if z < policy.min_noise_multiplier:
        return (f"privacy_policy: round announces {what}.{noise_key}={z:g}, below [privacy] "
                f"min_noise_multiplier = {policy.min_noise_multiplier:g}")
    return ""


def charge(policy: PrivacyPolicy, ann: RoundAnnouncement, num_samples: int) -> tuple[float, float, int]:
    """(noise multiplier, sampling rate, steps) one update of this round costs. Record level
    as the aggregator charges it: the round's DP-SGD steps on n records. Update level one
    release at rate 1, where the aggregator charges the selection fraction: the gateway
    cannot check that selection was secret (from the aggregator it is not)."""
    if policy.require == "record":
        n = max(int(num_samples), 1)
        return ann.train.dp_noise, sampling_rate(n, ann.train), dp_steps(n, ann.train)
    return ann.pipeline.noise_multiplier, 1.0, 1


def before_training(ledger: GatewayLedger, ann: RoundAnnouncement, last_samples: int) -> str:
    """Why this round is refused before training ("" if it is not): the policy, then the
    budget at the cost of the last update's rows (record level: unknown before the first
    update, so only the check when the update is made applies then)."""
    reason = refusal(ledger.policy, ann)
    if reason or (ledger.policy.require == "record" and last_samples < 1):
        return reason
    return ledger.over_budget(charge(ledger.policy, ann, last_samples))


class GatewayLedger:
    """The Gaussian releases this gateway has sent, as {(z, q): steps}."""

    def __init__(self, policy: PrivacyPolicy, events: Mapping[tuple[float, float], int] | None = None):
        self.policy = policy
        self.events: dict[tuple[float, float], int] = dict(events or {})

    def _events(self, extra: tuple[float, float, int] | None = None) -> list[tuple[float, float, int]]:
        counts = dict(self.events)
        if extra is not None:
            counts[extra[:2]] = counts.get(extra[:2], 0) + extra[2]
        return sorted((z, q, n) for (z, q), n in counts.items())

    def epsilon(self) -> float:
        return epsilon_of(self._events(), self.policy.delta)

    def over_budget(self, cost: tuple[float, float, int]) -> str:
        """"" if one more update at ``cost`` stays within max_epsilon, else the reason."""
        if self.policy.max_epsilon <= 0:
            return ""
        after = epsilon_of(self._events(cost), self.policy.delta)
        if after <= self.policy.max_epsilon:
            return ""
        return (f"privacy_budget_spent: epsilon {self.epsilon():.3g} spent, this round would make "
                f"it {after:.3g} > [privacy] max_epsilon = {self.policy.max_epsilon:g}")

    def record(self, cost: tuple[float, float, int]) -> None:
        z, q, n = float(cost[0]), float(cost[1]), int(cost[2])
        self.events[(z, q)] = self.events.get((z, q), 0) + n

    def to_dict(self) -> dict[str, Any]:
        return {"version": LEDGER_VERSION, "delta": self.policy.delta,
                "events": [[z, q, n] for (z, q), n in sorted(self.events.items())]}

    @classmethod
    def from_dict(cls, policy: PrivacyPolicy, data: Mapping[str, Any]) -> GatewayLedger:
        """Rebuild a saved ledger; a damaged one is refused (never silently emptied)."""
        try:
            if data["version"] != LEDGER_VERSION:
                raise ValueError(f"version {data['version']!r}")
            ledger = cls(policy)
            for z, q, n in data["events"]:
                if int(n) != n or n < 1 or not 0 < float(q) <= 1 or not math.isfinite(float(z)):
                    raise ValueError(f"bad event {[z, q, n]!r}")
                ledger.record((float(z), float(q), int(n)))
        except (KeyError, TypeError, ValueError) as exc:
            raise LocalProtocolError(f"privacy ledger {FILE} is damaged: {exc}") from exc
        return ledger
