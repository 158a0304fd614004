"""Prometheus metrics of the aggregator (`[state] metrics_port`), what plant ops scrape.

Served by prometheus-client's own HTTP thread on ``metrics_addr:metrics_port`` (loopback by
default). The runtime calls these hooks as it carries out the round machine's actions.
"""

from __future__ import annotations

from typing import Any

from fedcore.protocol.messages import RoundSummary


class AggregatorMetrics:
    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

        self.registry = CollectorRegistry()
        r: Any = self.registry
        self.accepted = Counter("fedgate_updates_accepted", "Updates accepted", registry=r)
        self.rejected = Counter("fedgate_updates_rejected", "Messages rejected, by reason",
                                ["reason"], registry=r)
        self.round = Gauge("fedgate_round", "Last committed round", registry=r)
        self.version = Gauge("fedgate_model_version", "Current global model version", registry=r)
        self.participants = Gauge("fedgate_round_participants",
                                  "Updates fused in the last round", registry=r)
        self.wall = Gauge("fedgate_round_wall_seconds", "Wall time of the last round", registry=r)
        self.bytes_up = Gauge("fedgate_round_bytes_up", "Update bytes of the last round", registry=r)
        self.epsilon = Gauge("fedgate_epsilon_spent", "Privacy budget spent, by gateway",
                             ["device"], registry=r)
        self.quarantined = Counter("fedgate_quarantines", "Gateways quarantined", registry=r)
        self.server, self.thread = start_http_server(port, addr=addr, registry=self.registry)

    def on_summary(self, summary: RoundSummary) -> None:
        self.round.set(summary.round)
        self.version.set(summary.model_version)
        self.participants.set(len(summary.participants))
        self.wall.set(summary.wall_s)
        self.bytes_up.set(summary.bytes_up)
        for device, eps in summary.epsilon.items():
            self.epsilon.labels(device=device).set(eps)

    def close(self) -> None:
        self.server.shutdown()
