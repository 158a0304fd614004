"""Privacy accounting on the aggregator: calibration, epsilon spent, and the per-gateway ledger.

The only module that imports ``dp_accounting`` (and with it scipy): gateways never do.

Model (docs/privacy.md has the long form). Each gateway clips its update to L2 norm C and
adds Gaussian noise of std z*C itself, so every update it publishes is a Gaussian mechanism
with noise multiplier z against *anyone* who sees it, the aggregator included. Over a run
a gateway's updates compose; the RDP accountant gives its (epsilon, delta) for the whole
sequence. The ledger charges each gateway one Gaussian event per update the aggregator
*accepted from it*, with sampling rate 1: the aggregator knows who was selected, so
amplification by sampling does not hold against it, and updates never sent cost nothing.

``noise_multiplier_for`` is the planning side: the smallest z that keeps ``rounds``
releases (Poisson-sampled at ``sampling_rate``, 1.0 for the local guarantee above) under a
target epsilon, by bisection on the accountant. ``epsilon_spent`` is the accountant itself.

Record level (DP-SGD on the gateway, ``fedcore/privacy/dpsgd.py``): the unit of privacy is
one sensor record of a gateway. Every local optimizer step is a Gaussian mechanism with
noise multiplier sigma, Poisson-sampled at ``q = batch_size / n`` (n = the gateway's local
records), so a round is ``dp_steps(n, train)`` such events and the ledger charges exactly
that per accepted update. Amplification by sampling holds here even against the aggregator:
which records went into which batch is secret to the gateway.
``record_noise_multiplier_for`` calibrates sigma before round 1, when n is not known yet,
with a configured lower bound ``min_records`` (smaller n means a larger q; see
docs/privacy.md for why that bound is the conservative side).

Budget policy when a gateway's next update would exceed the target: ``"stop"`` excludes it
(the aggregator stops selecting it and drops its updates), ``"warn"`` keeps it and raises an
alert each round. The ledger is a plain object, persisted as a JSON-able dict by the
checkpoint owner (``to_dict``/``from_dict``).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import dp_accounting
from dp_accounting import rdp

from fedcore.errors import LocalProtocolError
from fedcore.privacy.dpsgd import dp_steps, sampling_rate
from fedcore.protocol.messages import TrainConfig

# dp_accounting logs harmless "failed to converge" warnings for low RDP orders via absl
logging.getLogger("absl").setLevel(logging.ERROR)

POLICIES = ("stop", "warn")
LEVELS = ("update", "record")
LEDGER_VERSION = 1
MAX_NOISE_MULTIPLIER = 1e4


def _gaussian_event(noise_multiplier: float, sampling_rate: float, steps: int) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return dp_accounting.SelfComposedDpEvent(event, steps)


@functools.lru_cache(maxsize=4096)
def _epsilon_of(events: tuple[tuple[float, float, int], ...], delta: float) -> float:
    if not events:
        return 0.0
    if any(z <= 0 and q > 0 for z, q, _ in events):
        return math.inf  # an un-noised release has no finite epsilon
    accountant = rdp.RdpAccountant()
    for z, q, steps in events:
        if q > 0 and steps > 0:
            accountant.compose(_gaussian_event(z, q, steps))
    return float(accountant.get_epsilon(delta))


def epsilon_spent(noise_multiplier: float, sampling_rate: float, steps: int, delta: float) -> float:
    """Epsilon (RDP accountant) of ``steps`` Gaussian releases with noise multiplier z,
    each Poisson-sampled with probability ``sampling_rate`` (1.0 = always released)."""
    if not 0.0 <= sampling_rate <= 1.0 or steps < 0 or not 0.0 < delta < 1.0:
        raise ValueError("need 0 <= sampling_rate <= 1, steps >= 0, 0 < delta < 1")
    return _epsilon_of(((float(noise_multiplier), float(sampling_rate), int(steps)),), float(delta))


def noise_multiplier_for(
    target_epsilon: float, delta: float, rounds: int, sampling_rate: float = 1.0, tolerance: float = 1e-3
) -> float:
    """The smallest noise multiplier whose ``rounds`` releases stay within ``target_epsilon``.

    Epsilon decreases monotonically in z, so bisection between a z that is too small and
    one that is large enough finds it; the result is the upper end (never over budget).
    """
    if target_epsilon <= 0 or rounds < 1:
        raise ValueError("target_epsilon must be > 0 and rounds >= 1")
    low, high = 0.0, 1.0
    while epsilon_spent(high, sampling_rate, rounds, delta) > target_epsilon:
        low, high = high, high * 2
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"epsilon {target_epsilon} is out of reach with z <= {MAX_NOISE_MULTIPLIER}")
    while high - low > tolerance * max(high, 1e-3):
        mid = (low + high) / 2
        if epsilon_spent(mid, sampling_rate, rounds, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


def record_charge(train: TrainConfig, num_samples: int) -> tuple[float, int]:
    """(sampling rate, steps) of one DP-SGD round on ``num_samples`` records: what to charge."""
    return sampling_rate(num_samples, train), dp_steps(num_samples, train)


def record_epsilon(train: TrainConfig, num_samples: int, rounds: int, delta: float) -> float:
    """Record-level epsilon of ``rounds`` DP-SGD rounds at ``train.dp_noise`` on n records."""
    q, steps = record_charge(train, num_samples)
    return epsilon_spent(train.dp_noise, q, steps * rounds, delta)


def record_noise_multiplier_for(
    target_epsilon: float, delta: float, train: TrainConfig, rounds: int, min_records: int
) -> float:
    """The smallest DP-SGD sigma keeping ``rounds`` rounds on ``min_records`` records within
    ``target_epsilon`` (q = batch_size / min_records, ``rounds * dp_steps`` steps)."""
    if min_records < 1 or rounds < 1:
        raise ValueError("min_records and rounds must be >= 1")
    q, steps = record_charge(train, min_records)
    return noise_multiplier_for(target_epsilon, delta, steps * rounds, q)


@dataclass(frozen=True, slots=True)
class BudgetDecision:
    """Whether a gateway may contribute once more, and what the ledger has to say about it."""

    allowed: bool
    epsilon_now: float
    epsilon_after: float
    alert: str = ""


class PrivacyLedger:
    """Per-gateway epsilon spent, as the list of Gaussian releases charged to it."""

    def __init__(self, target_epsilon: float, delta: float, policy: str = "stop",
                 level: str = "update") -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}")
        if level not in LEVELS:
            raise ValueError(f"level must be one of {LEVELS}")
        # what one unit of privacy is: a gateway's whole data ("update") or one record ("record")
        self.level = level
        if not target_epsilon > 0 or not 0 < delta < 1:
            raise ValueError("target_epsilon must be > 0 and 0 < delta < 1")
        self.target_epsilon = float(target_epsilon)
        self.delta = float(delta)
        self.policy = policy
        # device -> {(noise multiplier, sampling rate): releases}
        self._events: dict[str, dict[tuple[float, float], int]] = {}

    def _key(self, device: str, extra: tuple[float, float] | None = None,
             steps: int = 1) -> tuple[tuple[float, float, int], ...]:
        counts = dict(self._events.get(device, {}))
        if extra is not None:
            counts[extra] = counts.get(extra, 0) + steps
        return tuple(sorted((z, q, n) for (z, q), n in counts.items()))

    def epsilon(self, device: str) -> float:
        return _epsilon_of(self._key(device), self.delta)

    def releases(self, device: str) -> int:
        return sum(self._events.get(device, {}).values())

    def spent(self) -> dict[str, float]:
        """Epsilon per gateway, for ``RoundSummary.epsilon``."""
        return {device: self.epsilon(device) for device in sorted(self._events)}

    def check(self, device: str, noise_multiplier: float, sampling_rate: float = 1.0,
              steps: int = 1) -> BudgetDecision:
        """Would one more update (``steps`` releases at this noise) keep ``device`` within
        the target? Record level: ``steps`` = the DP-SGD steps of that update."""
        now = self.epsilon(device)
        extra = (float(noise_multiplier), float(sampling_rate))
        after = _epsilon_of(self._key(device, extra, steps), self.delta)
        if after <= self.target_epsilon:
            return BudgetDecision(True, now, after)
        text = f"{device}: privacy budget epsilon={self.target_epsilon:g} would be exceeded ({after:.3g})"
        if self.policy == "warn":
            return BudgetDecision(True, now, after, text + "; continuing (policy warn)")
        return BudgetDecision(False, now, after, text + "; excluded (policy stop)")

    def record(self, device: str, noise_multiplier: float, sampling_rate: float = 1.0, steps: int = 1) -> float:
        """Charge ``device`` for ``steps`` accepted updates; returns its epsilon afterwards."""
        if steps < 1 or not 0 < sampling_rate <= 1 or noise_multiplier < 0:
            raise LocalProtocolError("record needs steps >= 1, 0 < sampling_rate <= 1, z >= 0")
        key = (float(noise_multiplier), float(sampling_rate))
        counts = self._events.setdefault(device, {})
        counts[key] = counts.get(key, 0) + steps
        return self.epsilon(device)

    def exhausted(self) -> list[str]:
        """Gateways already over the target (possible under policy "warn")."""
        return [d for d, eps in self.spent().items() if eps > self.target_epsilon]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "target_epsilon": self.target_epsilon,
            "delta": self.delta,
            "policy": self.policy,
            "level": self.level,
            "devices": {
                device: [[z, q, n] for (z, q), n in sorted(counts.items())]
                for device, counts in sorted(self._events.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PrivacyLedger:
        """Rebuild from :meth:`to_dict`; a damaged checkpoint is our fault, not a peer's."""
        try:
            if data["version"] != LEDGER_VERSION:
                raise ValueError(f"ledger version {data['version']!r}")
            ledger = cls(float(data["target_epsilon"]), float(data["delta"]), str(data["policy"]),
                         str(data.get("level", "update")))
            for device, rows in dict(data["devices"]).items():
                for z, q, n in rows:
                    if int(n) != n or n < 1:
                        raise ValueError(f"bad release count {n!r}")
                    ledger.record(str(device), float(z), float(q), int(n))
        except (KeyError, TypeError, ValueError, LocalProtocolError) as exc:
            raise LocalProtocolError(f"privacy ledger state is damaged: {exc}") from exc
        return ledger
