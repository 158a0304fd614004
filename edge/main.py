"""Assemble and run the gateway agent from its config file (`fedgate edge run`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from fedcore.pipeline import EdgePipelineState, make_encoder
from fedcore.protocol.topics import Topics
from fedcore.transport.base import Will
from fedcore.transport.factory import transport_from_config

from edge.config import EdgeConfig, load_edge_config
from edge.runtime import EdgeService, LocalData, status_payload
from edge.security import EdgeSecurity

log = logging.getLogger("fedgate.edge")


def load_local_data(config: EdgeConfig) -> LocalData:
    """This gateway's training and held-out data."""
    from fedcore.datasets import load_dataset

    d = config.data
    options = {}
    if d.dataset.startswith("csv:"):
        options = dict(unit_column=d.unit_column or None, target=d.target or None,
                       features=list(d.features) or None, task=d.task or None)
    dataset = load_dataset(d.dataset, gateways=d.gateways or None,
                           max_rows_per_unit=d.max_rows_per_unit or None, **options)
    if d.unit not in dataset.units:
        from fedcore.errors import ConfigError

        raise ConfigError(config.file, "data.unit", d.unit,
                          f"not a unit of data set {d.dataset!r}; units: {', '.join(sorted(dataset.units))}")
    unit = dataset.units[d.unit]
    scale = dataset.scaler.target_std if dataset.task == "regression" else 1.0
    return LocalData(unit.x_train, unit.y_train, unit.x_test, unit.y_test, float(scale))


def build_edge(config_path: str | Path) -> EdgeService:
    config = load_edge_config(config_path)
    data = load_local_data(config)
    security = EdgeSecurity.from_paths(config.file, config.security)
    topics = Topics(config.fleet, config.task)
    # the will is signed once at start-up; its content ("offline") does not go stale
    will = Will(topics.status(config.device),
                status_payload(config, security, "offline", -1, time.time()))
    transport = transport_from_config(config.broker, will=will, seed=config.seed)
    # the pipeline's randomness (noise, stochastic rounding) is separate from training's
    encode = make_encoder(EdgePipelineState(), np.random.default_rng([config.seed, 1]))
    return EdgeService(config, transport, data, security, encode=encode)


def run_edge(config_path: str | Path) -> int:
    service = build_edge(config_path)
    service.install_signal_handlers()
    return service.run()
