"""The fleet as an operator sees it: a pure view of the retained topics.

:class:`FleetView` takes decoded messages - gateway statuses, and per task the aggregator's
task state, last round summary and deployment record - and :meth:`FleetView.to_dict` turns
them into one JSON-able object, the same for ``fedgate status --json``, the table it
prints and the dashboard::

    {"fleet": ..., "time": ..., "tasks": [{"task", "lineage", "phase", "round",
     "model_version", "deployed_version", "metric", ...}],
     "gateways": [{"id", "online", "since", "model_version", "trained_version",
                   "activity", "rows", "rows_new", "last_round", "last_eval",
                   "quarantined", "epsilon", ...}],
     "rejected": {reason: count}}

``rejected`` counts messages this viewer could not decode or verify (with a keyring), by
reason; they are left out of the view. No clock, no network: the caller passes ``now``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from fedcore.protocol.messages import Deployment, RoundSummary, Status, TaskState


@dataclass
class _Gateway:
    status: Status
    task: str
    received: float


@dataclass
class _Task:
    state: TaskState | None = None
    summary: RoundSummary | None = None
    deployment: Deployment | None = None


@dataclass
class FleetView:
    fleet: str
    gateways: dict[str, _Gateway] = field(default_factory=dict)
    tasks: dict[str, _Task] = field(default_factory=dict)
    rejected: dict[str, int] = field(default_factory=dict)

    def on_status(self, device: str, task: str, status: Status, now: float) -> None:
        self.gateways[device] = _Gateway(status, task, now)

    def on_state(self, task: str, state: TaskState) -> None:
        self.tasks.setdefault(task, _Task()).state = state

    def on_summary(self, task: str, summary: RoundSummary) -> None:
        self.tasks.setdefault(task, _Task()).summary = summary

    def on_deployment(self, task: str, record: Deployment) -> None:
        self.tasks.setdefault(task, _Task()).deployment = record

    def on_rejected(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def to_dict(self, now: float, task: str | None = None) -> dict[str, Any]:
        tasks = {name: t for name, t in sorted(self.tasks.items()) if task is None or name == task}
        gateways = [self._gateway(name, g) for name, g in sorted(self.gateways.items())
                    if task is None or g.task == task]
        return {
            "fleet": self.fleet,
            "time": now,
            "tasks": [self._task(name, t) for name, t in tasks.items()],
            "gateways": gateways,
            "rejected": dict(self.rejected),
        }

    def _task(self, name: str, t: _Task) -> dict[str, Any]:
        s, summary, record = t.state, t.summary, t.deployment
        out: dict[str, Any] = {"task": name}
        if s is not None:
            last = s.history[-1] if s.history else None
            out.update({
                "lineage": s.lineage, "phase": s.phase, "round": s.round,
                "rounds_planned": s.rounds_planned, "model_version": s.model_version,
                "deployed_version": s.deployed_version, "deployment_mode": s.deployment_mode,
                "candidate": s.candidate, "canary": list(s.canary),
                "waiting_for": s.waiting_for, "next_round_at": s.next_round_at or None,
                "online": list(s.online), "quarantined": list(s.quarantined),
                "budget_spent": list(s.budget_spent), "rejected": dict(s.rejected),
                "epsilon": dict(s.epsilon),
                "metric": {"name": s.metric, "higher_is_better": s.metric_higher_is_better,
                           "value": _finite(last.metric) if last else None},
                "history": [{"round": p.round, "model_version": p.model_version,
                             "participants": p.participants, "rows": p.rows,
                             "metric": _finite(p.metric), "wall_s": _finite(p.wall_s), "time": p.time}
                            for p in s.history],
                "updated_at": s.updated_at,
            })
        if summary is not None:
            out["last_round"] = {
                "round": summary.round, "model_version": summary.model_version,
                "participants": list(summary.participants), "rows": summary.num_samples,
                "bytes_up": summary.bytes_up, "bytes_down": summary.bytes_down,
                "wall_s": summary.wall_s, "alerts": list(summary.alerts),
                "per_gateway": {d: {k: _finite(x) for k, x in v.items()}
                                for d, v in summary.per_gateway.items()},
            }
        if record is not None:
            out["deployment"] = {"sequence": record.sequence, "mode": record.mode,
                                 "version": record.version, "candidate": record.candidate,
                                 "canary": list(record.canary), "reason": record.reason,
                                 "time": record.timestamp}
        return out

    def _gateway(self, name: str, g: _Gateway) -> dict[str, Any]:
        st = g.status
        state = self.tasks.get(g.task, _Task()).state
        quarantined = bool(state and name in state.quarantined)
        epsilon = state.epsilon.get(name) if state else None
        return {
            "id": name, "task": g.task, "online": st.state == "online", "since": st.since or None,
            "model_version": st.model_version, "trained_version": st.trained_version,
            "lineage": st.lineage, "activity": st.activity, "activity_detail": st.activity_detail,
            "rows": st.rows, "rows_new": st.rows_new, "rows_needed": st.rows_needed,
            "last_round": st.last_round, "last_rows": st.last_rows,
            "last_eval": {k.removeprefix("eval_"): _finite(v) for k, v in st.last_eval.items()},
            "deployment": st.deployment, "quarantined": quarantined,
            "budget_spent": bool(state and name in state.budget_spent),
            "epsilon": epsilon if epsilon is not None else (st.epsilon or None),
            "rejected": dict(st.rejected), "software": st.software,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
