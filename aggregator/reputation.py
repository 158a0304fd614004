"""Per-gateway reputation and quarantine, from how far each update sits from the fused one.

Theory of operation
-------------------
After each round the aggregator knows every accepted update's L2 distance from the fused
update (``robust.outlier_distances`` or ``FusionResult.per_client_info["distance"]``).
Raw distances mean little across rounds (updates shrink as the model converges) and across
tasks, so each round's distances are divided by that round's median distance: an honest
gateway sits near 1, a gateway whose update points elsewhere sits far above it. The
median, not the mean, is the yardstick, so a minority of attackers cannot inflate it.

- A round with fewer than ``min_updates`` updates is not judged: a median of one or two
  distances says nothing about who is unusual.
- A gateway is an *outlier in a round* when its normalised distance exceeds
  ``outlier_ratio``. Its ``score`` is an exponentially weighted moving average of the
  normalised distance (newest round weighted ``smoothing``), reported with alerts; higher
  is worse. Ratios are capped at ``max_ratio`` so one absurd update cannot pin the score
  for ever and the state stays finite (JSON has no infinity).
- The window counts the gateway's own last ``window`` judged rounds, not the fleet's: a
  gateway with a flaky uplink is judged on what it sent, not on rounds it missed. When
  ``quarantine_after`` of them are outliers it is quarantined (a :class:`Quarantined`
  event). The runtime then ignores its updates, raises an alert on the metrics topic and
  writes an audit entry; while quarantined it is still scored if its updates are measured,
  but no further events are raised.
- Only an operator releases a gateway (:func:`release`, a :class:`Released` event). Release
  clears its window, so it must misbehave ``quarantine_after`` more times to be
  quarantined again.

Everything here is pure: the state is a frozen value, each call returns the new state and
the events, and ``to_dict``/``from_dict`` give the JSON form kept in checkpoints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any

import numpy as np

STATE_VERSION = 1


@dataclass(frozen=True)
class ReputationConfig:
    outlier_ratio: float = 3.0  # normalised distance above which a round counts against
    window: int = 5  # judged rounds of the gateway's own that are remembered
    quarantine_after: int = 3  # outlier rounds in the window that quarantine
    smoothing: float = 0.3  # weight of the newest round in the score's moving average
    min_updates: int = 3  # rounds with fewer updates are not judged
    max_ratio: float = 100.0  # cap on one round's normalised distance

    def check(self) -> None:
        """Raise ``ValueError`` naming the field that is out of range."""
        problems = [
            ("outlier_ratio", self.outlier_ratio > 1, "> 1"),
            ("window", self.window >= 1, ">= 1"),
            ("quarantine_after", 1 <= self.quarantine_after <= self.window, "in [1, window]"),
            ("smoothing", 0 < self.smoothing <= 1, "in (0, 1]"),
            ("min_updates", self.min_updates >= 2, ">= 2"),
            ("max_ratio", self.max_ratio >= self.outlier_ratio, ">= outlier_ratio"),
        ]
        for name, ok, requirement in problems:
            if not ok:
                raise ValueError(f"reputation {name} = {getattr(self, name)!r} must be {requirement}")


@dataclass(frozen=True)
class DeviceReputation:
    score: float  # moving average of the normalised distance; ~1 is typical
    recent: tuple[bool, ...] = ()  # outlier or not, in the last `window` judged rounds
    rounds_judged: int = 0
    quarantined_since: int | None = None  # the round that quarantined it

    @property
    def quarantined(self) -> bool:
        return self.quarantined_since is not None


@dataclass(frozen=True)
class Quarantined:
    device: str
    round: int
    score: float
    outlier_rounds: int  # outliers in the window that decided it


@dataclass(frozen=True)
class Released:
    device: str
    round: int


ReputationEvent = Quarantined | Released


def _empty() -> Mapping[str, DeviceReputation]:
    return MappingProxyType({})


@dataclass(frozen=True)
class ReputationState:
    devices: Mapping[str, DeviceReputation] = field(default_factory=_empty)

    @property
    def quarantined(self) -> frozenset[str]:
        return frozenset(d for d, r in self.devices.items() if r.quarantined)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            "devices": {
                name: {
                    "score": r.score,
                    "recent": [int(x) for x in r.recent],
                    "rounds_judged": r.rounds_judged,
                    "quarantined_since": r.quarantined_since,
                }
                for name, r in sorted(self.devices.items())
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReputationState:
        """Rebuild from :meth:`to_dict`; ``ValueError`` naming the bad entry."""
        if data.get("version") != STATE_VERSION:
            raise ValueError(f"reputation state version {data.get('version')!r}, expected {STATE_VERSION}")
        devices: dict[str, DeviceReputation] = {}
        raw = data.get("devices")
        if not isinstance(raw, Mapping):
            raise ValueError("reputation state: 'devices' is not a table")
        for name, entry in raw.items():
            try:
                since = entry["quarantined_since"]
                devices[str(name)] = DeviceReputation(
                    score=float(entry["score"]),
                    recent=tuple(bool(int(x)) for x in entry["recent"]),
                    rounds_judged=int(entry["rounds_judged"]),
                    quarantined_since=None if since is None else int(since),
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"reputation state: device {name!r}: {exc!r}") from None
        return cls(MappingProxyType(devices))


def normalised_distances(distances: Mapping[str, float], max_ratio: float = 100.0) -> dict[str, float]:
    """Each distance over the round's median distance, capped at ``max_ratio``."""
    values = np.array(list(distances.values()), dtype=np.float64)
    if values.size == 0:
        return {}
    if not np.isfinite(values).all() or (values < 0).any():
        raise ValueError(f"distances must be finite and >= 0, got {dict(distances)}")
    median = float(np.median(values))
    out: dict[str, float] = {}
    for device, d in distances.items():
        if median > 0:
            ratio = d / median
        else:
            # more than half sit exactly on the result: any distance at all is unusual
            ratio = 0.0 if d == 0 else max_ratio
        out[device] = float(min(ratio, max_ratio))
    return out


def observe(
    state: ReputationState,
    config: ReputationConfig,
    round_: int,
    distances: Mapping[str, float],
) -> tuple[ReputationState, list[ReputationEvent]]:
    """Judge one round's distances from the fused update; the new state and any events."""
    if len(distances) < config.min_updates:
        return state, []
    ratios = normalised_distances(distances, config.max_ratio)
    devices = dict(state.devices)
    events: list[ReputationEvent] = []
    for device in sorted(ratios):
        ratio = ratios[device]
        old = devices.get(device)
        score = ratio if old is None else (1 - config.smoothing) * old.score + config.smoothing * ratio
        recent = ((old.recent if old else ()) + (ratio > config.outlier_ratio,))[-config.window :]
        new = DeviceReputation(
            score=float(score),
            recent=recent,
            rounds_judged=(old.rounds_judged if old else 0) + 1,
            quarantined_since=old.quarantined_since if old else None,
        )
        outliers = sum(recent)
        if not new.quarantined and outliers >= config.quarantine_after:
            new = replace(new, quarantined_since=round_)
            events.append(Quarantined(device, round_, new.score, outliers))
        devices[device] = new
    return ReputationState(MappingProxyType(devices)), events


def release(
    state: ReputationState, device: str, round_: int
) -> tuple[ReputationState, list[ReputationEvent]]:
    """The operator's release; no event if ``device`` was not quarantined."""
    current = state.devices.get(device)
    if current is None or not current.quarantined:
        return state, []
    devices = dict(state.devices)
    devices[device] = replace(current, recent=(), quarantined_since=None)
    return ReputationState(MappingProxyType(devices)), [Released(device, round_)]
