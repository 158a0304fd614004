"""The published summary of a committed round, from the updates it fused (pure)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedcore.protocol.messages import RoundSummary

if TYPE_CHECKING:
    from aggregator.rounds import RoundStateMachine

# what of an update's statistics goes into summaries and history (the rest is dropped: a
# gateway must not grow the checkpoint with keys of its own invention)
KEPT_STATS = ("train_s", "rows_new", "pre_clip_norm", "clip_indicator")


def round_summary(machine: RoundStateMachine, devices: list[str], counts: list[float],
                  now: float) -> RoundSummary:
    """The published summary of the round being committed: means of the gateways' own
    figures weighted by ``counts`` (their fusion weights), each gateway's evaluation and
    claimed rows, bytes, rejections, privacy."""
    received = machine.received
    metrics: dict[str, float] = {}
    total = sum(counts)
    keys = {k for d in devices for k in received[d].update.stats
            if k.startswith("eval_") or k in KEPT_STATS}
    for key in sorted(keys):
        pairs = [(received[d].update.stats[key], c) for d, c in zip(devices, counts, strict=True)
                 if key in received[d].update.stats]
        weight = sum(c for _, c in pairs)
        if weight > 0:
            metrics[key] = float(sum(v * c for v, c in pairs) / weight)
        if key.endswith("_s"):  # timings: the slowest gateway bounds the round
            metrics[f"{key}_max"] = float(max(v for v, _ in pairs))
    metrics["train_loss"] = float(
        sum(received[d].update.train_loss * c for d, c in zip(devices, counts, strict=True)) / total
    )
    per_gateway = {
        d: {**{k: float(v) for k, v in received[d].update.stats.items() if k.startswith("eval_")},
            "rows": float(received[d].update.num_samples)}
        for d in devices
    }
    return RoundSummary(
        round=machine.round,
        model_version=machine.version,
        participants=tuple(devices),
        num_samples=int(sum(received[d].update.num_samples for d in devices)),
        metrics=metrics,
        bytes_up=sum(received[d].wire_bytes for d in devices),
        wall_s=now - machine.announced_at,
        rejected=dict(machine.rejected),
        epsilon=machine.ledger.spent() if machine.ledger is not None else {},
        alerts=tuple(machine.alerts),
        lineage=machine.lineage,
        per_gateway=per_gateway,
    )
