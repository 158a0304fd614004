"""Assemble and run the gateway agent from its config file (`fedgate edge run`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import EdgeConfig, load_edge_config
from edge.data import DatasetSource, DataSource, StoreSource
from edge.outbox import Outbox
from edge.runtime import EdgeService, offline_status
from edge.security import EdgeSecurity
from edge.spool import Spool
from edge.store import StoreReader
from fedcore.errors import ConfigError
from fedcore.pipeline import EdgePipelineState, make_encoder
from fedcore.protocol import codec
from fedcore.protocol.topics import Topics
from fedcore.systemd import SystemdNotifier
from fedcore.trace import tracer
from fedcore.transport.base import Will
from fedcore.transport.factory import transport_from_config
from fedcore.transport.tls import check_identity

log = logging.getLogger("fedgate.edge")


def make_source(config: EdgeConfig) -> DataSource:
    """This gateway's rows: its bridge's sample store (``source = "store"``), or one unit of
    a packaged or CSV data set (``source = "dataset"``: demo and benchmarks)."""
    d = config.data
    if d.source == "store":
        assert d.store is not None and d.rows is not None  # checked when the config loaded
        reader = StoreReader(d.store, d.device, d.rows.signals, since_s=d.rows.window_s)
        return StoreSource(d.rows, reader)
    return dataset_source(config)


def dataset_source(config: EdgeConfig) -> DatasetSource:
    from fedcore.datasets import load_dataset

    d = config.data
    options: dict[str, Any] = {}
    if d.dataset.startswith("csv:"):
        options = dict(unit_column=d.unit_column or None, target=d.target or None,
                       features=list(d.features) or None, task=d.task or None)
    if d.num_rows:
        from fedcore.datasets.wind import load_wind_rows

        if d.dataset != "wind" or d.gateways not in (0, 4) or d.max_rows_per_unit:
            raise ConfigError(config.file, "data.num_rows", d.num_rows,
                              "a row window needs dataset = \"wind\" (4 turbines, no max_rows_per_unit)")
        dataset = load_wind_rows(d.first_row, d.num_rows)
    else:
        dataset = load_dataset(d.dataset, gateways=d.gateways or None,
                               max_rows_per_unit=d.max_rows_per_unit or None, **options)
    if d.unit not in dataset.units:
        raise ConfigError(config.file, "data.unit", d.unit,
                          f"not a unit of data set {d.dataset!r}; units: {', '.join(sorted(dataset.units))}")
    unit = dataset.units[d.unit]
    scale = dataset.scaler.target_std if dataset.task == "regression" else 1.0
    return DatasetSource(unit.x_train, unit.y_train, unit.x_test, unit.y_test, float(scale),
                         dataset.task, tuple(dataset.features), dataset.target)


def build_edge(config_path: str | Path) -> EdgeService:
    config = load_edge_config(config_path)
    if config.broker.url.startswith("mqtts://"):
        check_identity(config.broker.cert_file, config.file,
                       [("device.id", config.device), ("broker.client_id", config.broker.client_id)])
    source = make_source(config)
    security = EdgeSecurity.from_paths(config.file, config.security,
                                       codec.Limits(max_message_bytes=config.broker.max_message))
    topics = Topics(config.fleet, config.task)
    # the will is signed once at start-up; its content ("offline") does not go stale
    will = Will(topics.status(config.device), offline_status(config, security, time.time()))
    # PUBACKs are reported so the spool keeps each message until the broker has it
    transport = transport_from_config(config.broker, will=will, report_acks=True)
    # the pipeline's randomness (noise, stochastic rounding) is separate from training's
    encode = make_encoder(EdgePipelineState(), np.random.default_rng([config.seed, 1]))
    attack = None
    if config.attack:  # attack experiments only: this gateway lies on purpose
        from edge.attacks import make_attack

        attack = make_attack(config.attack, np.random.default_rng([config.seed, 2]))
        log.warning("EXPERIMENT: this gateway runs the %r attack", config.attack)
    server = None
    if config.inference:
        from edge.serving import ModelServer

        server = ModelServer(config.state_dir / "models", config.keep_models)
    metrics = None
    if config.metrics_port:
        from edge.metrics import EdgeMetrics

        try:
            metrics = EdgeMetrics(config.metrics_port, config.metrics_addr)
        except OSError as exc:
            raise ConfigError(config.file, "state.metrics_port", config.metrics_port,
                              f"cannot listen on {config.metrics_addr}:{config.metrics_port}: "
                              f"{exc.strerror or exc}") from None
    try:
        spool = Spool(config.state_dir, config.spool.max_entries, config.spool.max_bytes)
    except OSError as exc:
        raise ConfigError(config.file, "state.dir", str(config.state_dir),
                          f"cannot open the spool there: {exc.strerror or exc}") from None
    return EdgeService(config, transport, source, security, encode=encode, attack=attack,
                       notifier=SystemdNotifier.from_environment(), server=server, metrics=metrics,
                       trace=tracer(config.trace, config.state_dir),
                       outbox=Outbox(transport, spool, metrics))


def run_edge(config_path: str | Path) -> int:
    service = build_edge(config_path)
    service.install_signal_handlers()
    return service.run()
