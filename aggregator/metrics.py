"""Prometheus metrics of the aggregator (`[state] metrics_port`), what plant ops scrape.

Served by :mod:`fedcore.exporter` on ``metrics_addr:metrics_port`` (loopback by default).
Gauges describe the state (round, version, deployed version, phase, online gateways) and
are set from the restored state at start-up, so a resumed aggregator never reads 0; the
counters count what this process did since it started (Prometheus handles restarts).
"""

from __future__ import annotations

import math

from fedcore.exporter import MetricsServer, Registry
from fedcore.protocol.messages import RoundSummary, TaskState

PHASES = ("statistics", "collecting", "waiting", "finished")


class AggregatorMetrics:
    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        r = self.registry = Registry()
        self.accepted = r.counter("fedgate_updates_accepted", "Updates accepted")
        self.rejected = r.counter("fedgate_updates_rejected", "Messages rejected, by reason", ["reason"])
        self.quarantined = r.counter("fedgate_quarantines", "Gateways quarantined")
        self.round = r.gauge("fedgate_round", "Last committed round")
        self.version = r.gauge("fedgate_model_version", "Current global model version")
        self.deployed = r.gauge("fedgate_deployed_version", "Model version the fleet runs")
        self.phase = r.gauge("fedgate_phase", "1 for the aggregator's current phase", ["phase"])
        self.online = r.gauge("fedgate_gateways_online", "Gateways online")
        self.ready = r.gauge("fedgate_gateways_ready", "Online gateways with enough data to take part")
        self.participants = r.gauge("fedgate_round_participants", "Updates fused in the last round")
        self.rows = r.gauge("fedgate_round_rows", "Training rows behind the last round")
        self.fleet_metric = r.gauge("fedgate_fleet_metric",
                                    "Sample-weighted holdout metric of the last round", ["metric"])
        self.wall = r.gauge("fedgate_round_wall_seconds", "Wall time of the last round")
        self.bytes_up = r.gauge("fedgate_round_bytes_up", "Update bytes of the last round")
        self.epsilon = r.gauge("fedgate_epsilon_spent", "Privacy budget spent, by gateway", ["device"])
        self.disk_full = r.gauge("fedgate_state_write_failing", "1 while the state cannot be written")
        self.server = MetricsServer(r, port, addr)

    def on_summary(self, summary: RoundSummary, metric: str) -> None:
        self.participants.set(len(summary.participants))
        self.rows.set(summary.num_samples)
        self.wall.set(summary.wall_s)
        self.bytes_up.set(summary.bytes_up)
        value = summary.metrics.get(f"eval_{metric}")
        if value is not None:
            self.fleet_metric.set(value, metric=metric)
        for device, eps in summary.epsilon.items():
            self.epsilon.set(eps, device=device)

    def on_state(self, state: TaskState) -> None:
        """Gauges from the task state (also right after a resume)."""
        self.round.set(max(0, state.round - 1) if state.phase != "statistics" else 0)
        self.version.set(state.model_version)
        self.deployed.set(state.deployed_version)
        for phase in PHASES:
            self.phase.set(1 if state.phase == phase else 0, phase=phase)
        self.online.set(len(state.online))
        if state.history and not math.isnan(state.history[-1].metric):
            self.fleet_metric.set(state.history[-1].metric, metric=state.metric)
        for device, eps in state.epsilon.items():
            self.epsilon.set(eps, device=device)

    def close(self) -> None:
        self.server.close()
