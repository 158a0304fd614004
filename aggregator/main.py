"""Assemble and run the aggregator service from its config file (`fedgate aggregator run`)."""

from __future__ import annotations

import logging
from pathlib import Path

from fedcore.transport.factory import transport_from_config

from aggregator.config import load_aggregator_config
from aggregator.runtime import AggregatorService
from aggregator.security import AggregatorSecurity

log = logging.getLogger("fedgate.aggregator")


def build_aggregator(config_path: str | Path) -> AggregatorService:
    config = load_aggregator_config(config_path)
    transport = transport_from_config(config.broker, seed=config.seed)
    return AggregatorService(config, transport, AggregatorSecurity())


def run_aggregator(config_path: str | Path) -> int:
    service = build_aggregator(config_path)
    service.install_signal_handlers()
    return service.run()
