"""Prometheus metrics of a gateway (`[state] metrics_port`), served by fedcore.exporter."""

from __future__ import annotations

from fedcore.exporter import MetricsServer, Registry


class EdgeMetrics:
    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        r = self.registry = Registry()
        self.rows = r.gauge("fedgate_edge_rows", "Rows held for training (training + holdout)")
        self.rows_new = r.gauge("fedgate_edge_rows_new", "Training rows no round has used yet")
        self.waiting = r.gauge("fedgate_edge_waiting_for_data", "1 while the gateway has too few rows to take part")
        self.model_version = r.gauge("fedgate_edge_model_version", "Version its inference runs (deployed)")
        self.trained_version = r.gauge("fedgate_edge_trained_version", "Global model version it trains from")
        self.last_round = r.gauge("fedgate_edge_last_round", "Last round it sent an update for")
        self.train_rows = r.gauge("fedgate_edge_train_rows", "Training rows of its last update")
        self.train_seconds = r.gauge("fedgate_edge_train_seconds", "Local training time of its last update")
        self.holdout = r.gauge("fedgate_edge_holdout", "Its holdout evaluation of the model it trains from",
                               ["metric"])
        self.updates = r.counter("fedgate_edge_updates", "Updates sent")
        self.sat_out = r.counter("fedgate_edge_rounds_sat_out", "Rounds it did not take part in, by reason",
                                 ["reason"])
        self.rejected = r.counter("fedgate_edge_rejected", "Messages it refused, by reason", ["reason"])
        self.spool_entries = r.gauge("fedgate_edge_spool_entries",
                                     "Messages spooled on disk that the broker has not acknowledged")
        self.spool_bytes = r.gauge("fedgate_edge_spool_bytes", "Bytes those spooled messages take")
        self.spool_dropped = r.counter("fedgate_edge_spool_dropped",
                                       "Messages that left the spool unsent, by reason", ["reason"])
        self.connected = r.gauge("fedgate_edge_connected", "1 while connected to the broker")
        self.server = MetricsServer(r, port, addr)

    def close(self) -> None:
        self.server.close()
