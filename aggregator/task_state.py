"""The task's retained state for operators (``fg/{fleet}/{task}/state``), from the round
machine and the deployment manager (pure)."""

from __future__ import annotations

import math

from aggregator import deployment as dm
from aggregator import rounds as sm
from fedcore.protocol.messages import RoundPoint, TaskState

STATE_HISTORY = 200  # rounds in the retained task state (the dashboard's charts)


def task_state(m: sm.RoundStateMachine, deploy: dm.DeploymentManager, rounds_planned: int,
               rejected: dict[str, int], write_problem: str, now: float) -> TaskState:
    """What `fedgate status` and the dashboard show of the task. ``write_problem``: why
    the state cannot be written (it replaces what the round waits for), or ""."""
    history = tuple(
        RoundPoint(int(h["round"]), int(h.get("version", h["round"])), int(h["participants"]),
                   int(h.get("rows", 0)), float(h.get("metric", math.nan)), float(h["wall_s"]),
                   float(h.get("time", 0.0)))
        for h in m.history[-STATE_HISTORY:]
    )
    canary = deploy.canary
    return TaskState(
        lineage=m.lineage, phase=m.phase.value, round=m.round, model_version=m.version,
        rounds_planned=rounds_planned, waiting_for=write_problem or waiting_for(m),
        next_round_at=m.next_check if m.phase is sm.Phase.WAITING else 0.0,
        online=tuple(sorted(m.online)), quarantined=tuple(sorted(m.reputation.quarantined)),
        budget_spent=tuple(sorted(m.excluded)),
        deployed_version=m.version if deploy.mode == "latest" else deploy.version,
        deployment_mode=deploy.mode, candidate=canary.candidate if canary else -1,
        canary=canary.devices if canary else (), rejected=dict(rejected),
        epsilon=m.ledger.spent() if m.ledger is not None else {}, metric=m.metric,
        metric_higher_is_better=m.metric_higher_is_better, history=history, updated_at=now,
    )


def waiting_for(m: sm.RoundStateMachine) -> str:
    """What the operator waits for, in words."""
    if m.phase is sm.Phase.WAITING:
        return m.waiting_for
    unready = len(m.unready & m.online)
    not_ready = f"; {unready} online but not ready (waiting for data)" if unready else ""
    if m.phase is sm.Phase.STATISTICS:
        return (f"statistics from {len(m.stats)} of {len(m.expected())} ready gateways "
                f"(at least {m.quorum()}){not_ready}")
    if m.phase is sm.Phase.COLLECTING:
        return (f"updates from {len(m.received)} of {len(m.expected())} ready gateways "
                f"(at least {m.quorum()}){not_ready}")
    return ""
