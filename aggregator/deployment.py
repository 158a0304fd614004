"""Which model version the fleet runs: deployments, staged rollouts and roll-backs.

Theory of operation
-------------------
Pure: methods take ``now`` and return actions; the runtime publishes the records (with the
weights read from the kept model files), exports the deployed .tflite and writes the audit
log. Training is not affected: it always continues from the newest global model. What
changes is what the gateways *run* (``edge.deployment``).

Modes of the signed ``Deployment`` record (one sequence number per record, never reused):

- ``latest``: every gateway runs the newest model. The default ``[deploy] policy =
  "latest"`` stays here; each commit is deployed as it is made.
- ``version``: every gateway runs ``version``. An operator's ``fedgate model deploy V`` or
  ``rollback`` (the version deployed before the current one) pins the fleet there until
  ``fedgate model deploy latest``; a promoted candidate also lands here.
- ``canary``: policy ``"canary"``: each new model (every ``every`` versions) first goes to
  ``canary_fraction`` of the ready gateways (at least one), which evaluate it and the
  incumbent on their own holdout rows and report. When every canary reported, or at
  ``canary_timeout_s`` with at least one report, the candidate is promoted if the (upper) median
  of the canaries' relative worsening (candidate against incumbent, each on its own holdout
  rows) is at most ``max_regression``; otherwise the fleet stays on the incumbent (rolled
  back). A canary without holdout rows abstains (an empty report); with no judging canary
  the candidate is rolled back at once. Reports with non-finite or negative metrics are
  refused. The reports in are
  checkpointed, so a restarted aggregator decides on them.
  No report at all by the timeout: rolled back (no evidence is not good evidence). Either
  way an audit entry records the decision and the figures.

While an operator's pin holds, automatic candidates wait. The state is checkpointed.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from fedcore.protocol.messages import CanaryReport, DeployedModel, ModelSpec

POLICIES = ("latest", "canary")
HISTORY_KEPT = 50


@dataclass(frozen=True, slots=True)
class DeployConfig:
    policy: str = "latest"
    every: int = 1  # canary: a candidate every N versions
    canary_fraction: float = 0.25
    max_regression: float = 0.02
    canary_timeout_s: float = 300.0


@dataclass(frozen=True, slots=True)
class PublishDeployment:
    sequence: int
    mode: str
    version: int
    candidate: int = -1
    canary: tuple[str, ...] = ()
    reason: str = ""


@dataclass(frozen=True, slots=True)
class DeploymentDecided:
    """A canary's outcome, for the audit log and the operator."""

    candidate: int
    incumbent: int
    promoted: bool
    detail: str
    figures: dict[str, float] = field(default_factory=dict)


DeployAction = PublishDeployment | DeploymentDecided


@dataclass
class _Canary:
    candidate: int
    devices: tuple[str, ...]
    started: float
    reports: dict[str, CanaryReport] = field(default_factory=dict)


class DeploymentManager:
    def __init__(self, config: DeployConfig, metric: str, higher_is_better: bool) -> None:
        self.config = config
        self.metric = metric
        self.higher_is_better = higher_is_better
        self.sequence = -1
        self.mode = "latest"
        self.version = -1  # deployed version (mode latest: the newest committed)
        self.pinned = False  # an operator chose the version; automatic candidates wait
        self.canary: _Canary | None = None
        self.history: list[dict[str, Any]] = []  # (sequence, mode, version, reason, time)

    # ---- events ------------------------------------------------------------------------

    def on_start(self, version: int, now: float) -> list[DeployAction]:
        """A fresh lineage: its first record. A restored state re-announces nothing."""
        if self.sequence >= 0:
            return []
        self.version = version
        if self.config.policy == "canary":  # nothing runs before a canary has judged it
            return [self._record("version", version, now, "lineage started")]
        return [self._record("latest", version, now, "lineage started")]

    def on_commit(self, version: int, ready: list[str], now: float,
                  rng: random.Random) -> list[DeployAction]:
        """A new global model ``version`` was committed."""
        if self.mode == "latest" and not self.pinned:
            if self.config.policy == "latest":
                self.version = version
                if self.history:  # the fleet runs it under the current record
                    self.history[-1]["newest"] = version
                return []
        if self.pinned or self.canary is not None or self.config.policy != "canary":
            return []
        if version % max(1, self.config.every):
            return []
        if not ready:
            return []
        k = max(1, round(self.config.canary_fraction * len(ready)))
        devices = tuple(sorted(rng.sample(sorted(ready), min(k, len(ready)))))
        incumbent = self.version if self.version >= 0 else version - 1
        self.version = incumbent
        self.canary = _Canary(version, devices, now)
        return [self._record("canary", incumbent, now, f"candidate {version} on {len(devices)} canaries",
                             candidate=version, canary=devices)]

    def on_report(self, device: str, report: CanaryReport, now: float) -> list[DeployAction] | str:
        """A canary's report; a string is the reason it was refused."""
        c = self.canary
        if c is None or report.sequence != self.sequence:
            return "no_canary"
        if device not in c.devices:
            return "not_canary"
        if report.candidate != c.candidate or report.incumbent != self.version:
            return "wrong_versions"
        if report.num_rows == 0 and not report.candidate_metrics and not report.incumbent_metrics:
            pass  # this canary has no holdout rows: it abstains (counted, not judged)
        else:
            values = (report.candidate_metrics.get(self.metric), report.incumbent_metrics.get(self.metric))
            if any(v is None or not math.isfinite(v) or v < 0 for v in values) or report.num_rows < 1:
                return "bad_report"
        c.reports[device] = report
        if set(c.reports) >= set(c.devices):
            return self._decide(now)
        return []

    def on_tick(self, now: float) -> list[DeployAction]:
        c = self.canary
        if c is None or now < c.started + self.config.canary_timeout_s:
            return []
        return self._decide(now)

    # ---- operator commands -------------------------------------------------------------

    def deploy(self, version: int, now: float, reason: str) -> list[DeployAction]:
        self.canary = None
        self.pinned = True
        self.version = version
        return [self._record("version", version, now, reason)]

    def follow_latest(self, latest: int, now: float) -> list[DeployAction]:
        self.canary = None
        self.pinned = False
        self.version = latest
        return [self._record("latest", latest, now, "operator: deploy latest")]

    def needed(self) -> set[int]:
        """Versions whose model files must be kept: deployed now or lately, on trial."""
        out = {self.version}
        if self.canary is not None:
            out.add(self.canary.candidate)
        for h in self.history[-10:]:
            out.add(int(h["version"]))
            if int(h.get("candidate", -1)) >= 0:
                out.add(int(h["candidate"]))
        return {v for v in out if v >= 0}

    def rollback_target(self, latest: int) -> int | None:
        """The version deployed before the current one (mode latest: the one before the
        newest), or None when there is none."""
        current = latest if self.mode == "latest" else self.version
        # a "latest" record covers every version the fleet ran under it, up to "newest"
        earlier = [min(h.get("newest", h["version"]), current - 1) for h in self.history
                   if 0 <= h["version"] < current]
        if self.mode == "latest" and current - 1 >= 0:
            earlier.append(current - 1)
        return max(earlier) if earlier else None

    # ---- internals ---------------------------------------------------------------------

    def _decide(self, now: float) -> list[DeployAction]:
        c = self.canary
        assert c is not None
        self.canary = None
        incumbent = self.version
        reports = [r for r in c.reports.values() if r.num_rows > 0]
        if not reports:
            why = (f"no canary has holdout rows to judge it ({len(c.reports)} answered)" if c.reports
                   else f"no canary reported within {self.config.canary_timeout_s:g} s")
            decided = DeploymentDecided(c.candidate, incumbent, False, why)
            return [decided, self._record("version", incumbent, now,
                                          f"candidate {c.candidate} rolled back: {why}")]
        # each canary's own verdict (its relative worsening), the median decides: no single
        # canary - a broken or a lying one - can force a promotion or a roll-back
        worsening = sorted(_worsening(r.candidate_metrics[self.metric], r.incumbent_metrics[self.metric],
                                      self.higher_is_better) for r in reports)
        median = worsening[len(worsening) // 2]  # the upper median: a tie is not a promotion
        promoted = median <= self.config.max_regression
        cand = sum(r.candidate_metrics[self.metric] for r in reports) / len(reports)
        inc = sum(r.incumbent_metrics[self.metric] for r in reports) / len(reports)
        rows = sum(min(r.num_rows, 10**9) for r in reports)
        figures = {"candidate_metric": cand, "incumbent_metric": inc, "median_worsening": median,
                   "reports": float(len(reports)), "rows": float(rows)}
        detail = (f"{self.metric} {cand:.4g} vs {inc:.4g} (mean of {len(reports)} canaries, "
                  f"{rows} holdout rows), median worsening {median:.1%}; allowed "
                  f"{self.config.max_regression:.1%}")
        decided = DeploymentDecided(c.candidate, incumbent, promoted, detail, figures)
        if promoted:
            self.version = c.candidate
            return [decided, self._record("version", c.candidate, now, f"candidate {c.candidate} promoted: {detail}")]
        return [decided, self._record("version", incumbent, now, f"candidate {c.candidate} rolled back: {detail}")]

    def _record(self, mode: str, version: int, now: float, reason: str, candidate: int = -1,
                canary: tuple[str, ...] = ()) -> PublishDeployment:
        self.sequence += 1
        self.mode = mode
        self.history.append({"sequence": self.sequence, "mode": mode, "version": version,
                             "candidate": candidate, "reason": reason[:300], "time": now})
        del self.history[:-HISTORY_KEPT]
        return PublishDeployment(self.sequence, mode, version, candidate, canary, reason)

    # ---- checkpoint --------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        c = self.canary
        return {
            "sequence": self.sequence, "mode": self.mode, "version": self.version,
            "pinned": self.pinned, "history": self.history,
            "canary": None if c is None else {
                "candidate": c.candidate, "devices": list(c.devices), "started": c.started,
                "reports": {d: msgspec.to_builtins(r) for d, r in c.reports.items()}},
        }

    def restore(self, data: dict[str, Any]) -> None:
        self.sequence = int(data.get("sequence", -1))
        self.mode = str(data.get("mode", "latest"))
        self.version = int(data.get("version", -1))
        self.pinned = bool(data.get("pinned", False))
        self.history = list(data.get("history", []))[-HISTORY_KEPT:]
        c = data.get("canary")
        self.canary = None if c is None else _Canary(
            int(c["candidate"]), tuple(c["devices"]), float(c["started"]),
            {d: msgspec.convert(r, CanaryReport) for d, r in c.get("reports", {}).items()})


def _worsening(candidate: float, incumbent: float, higher_is_better: bool) -> float:
    """How much worse the candidate is, relative to the incumbent (negative: better)."""
    worse = (incumbent - candidate) if higher_is_better else (candidate - incumbent)
    return worse / max(abs(incumbent), 1e-12)


def deployed_model(spec: ModelSpec, weights: list[np.ndarray], sequence: int, lineage: str,
                   version: int) -> DeployedModel:
    """The body published on ``.../deployed`` for other plant systems: a float32 .tflite on
    raw units (the fleet scaler folded in), with its SHA-256. Needs the ``litert`` extra's
    flatbuffers and tflite schema packages (ImportError otherwise)."""
    from fedcore.learning.models import fold_scaler
    from fedcore.learning.tflite_export import export_float

    plain, folded = fold_scaler(spec, weights)
    tflite = export_float(plain, folded)
    return DeployedModel(sequence, lineage, version, spec, tflite, hashlib.sha256(tflite).digest())
