"""Assemble and run the gateway agent from its config file (`fedgate edge run`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edge.config import EdgeConfig, load_edge_config
from edge.runtime import EdgeService, LocalData, status_payload
from edge.security import EdgeSecurity
from fedcore.pipeline import EdgePipelineState, make_encoder
from fedcore.protocol.topics import Topics
from fedcore.systemd import SystemdNotifier
from fedcore.transport.base import Will
from fedcore.transport.factory import transport_from_config

log = logging.getLogger("fedgate.edge")


def load_local_data(config: EdgeConfig) -> LocalData:
    """This gateway's training and held-out data: from its sample store (``source =
    "store"``, rows that crossed the field bus) or from a packaged/CSV data set."""
    if config.data.source == "store":
        return load_store_data(config)
    from fedcore.datasets import load_dataset
    from fedcore.errors import ConfigError

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
    return LocalData(unit.x_train, unit.y_train, unit.x_test, unit.y_test, float(scale))


def load_store_data(config: EdgeConfig) -> LocalData:
    """Rows the bridge wrote for ``data.device``, split and labelled as the wind data set's
    direct path does, scaled with the fleet scaler from ``[data.scaler]``.

    Only the turbine's own rows are known here, so the plant-level exclusions of the direct
    path (availability loss, curtailment) are not applied (docs/field-bus.md)."""
    from fedcore.datasets.base import Scaler
    from fedcore.datasets.wind import wind_unit_from_rows
    from fedcore.errors import ConfigError

    d = config.data
    assert d.store is not None and d.scaler is not None  # checked when the config loaded
    if not d.store.exists():
        raise ConfigError(config.file, "data.store", str(d.store), "no such file (is the bridge running?)")
    records, row_time, values = store_rows(d.store, d.device)
    if d.num_rows:
        keep = (records >= d.first_row) & (records < d.first_row + d.num_rows)
        row_time, values = row_time[keep], values[keep]
    if row_time.size == 0:
        raise ConfigError(config.file, "data.device", d.device, f"no rows of this device in {d.store}")
    s = d.scaler
    scaler = Scaler(np.array(s.feature_mean), np.array(s.feature_std), s.target_mean, s.target_std)
    if scaler.feature_mean.shape != (5,):
        raise ConfigError(config.file, "data.scaler.feature_mean", list(s.feature_mean),
                          "the wind features need 5 values")
    raw = wind_unit_from_rows(row_time, values)
    log.info("store %s: %d rows of %s -> %d training, %d test rows", d.store, row_time.size,
             d.device, len(raw.y_train), len(raw.y_test))
    return LocalData(scaler.transform(raw.x_train), scaler.transform_target(raw.y_train),
                     scaler.transform(raw.x_test), scaler.transform_target(raw.y_test),
                     float(s.target_std))


def store_rows(path: Path, device: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(record numbers, row times, raw values ``(n, 7)`` float32 in the data set's column
    order) of one turbine, one row per record, in record order."""
    from edge.store import WIND_COLUMNS, SampleStore

    store = SampleStore(path)
    try:
        rows = store.rows(device, (*WIND_COLUMNS, "row_seq"), time_signal="row_time",
                          seq_signal="row_seq")
    finally:
        store.close()
    # row_seq travels as a float32 column: exact for record numbers below 2**24
    return rows.values[:, -1].astype(np.int64), rows.time.astype(np.int64), rows.values[:, :-1]


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
    attack = None
    if config.attack:  # attack experiments only: this gateway lies on purpose
        from edge.attacks import make_attack

        attack = make_attack(config.attack, np.random.default_rng([config.seed, 2]))
        log.warning("EXPERIMENT: this gateway runs the %r attack", config.attack)
    return EdgeService(config, transport, data, security, encode=encode, attack=attack,
                       notifier=SystemdNotifier.from_environment())


def run_edge(config_path: str | Path) -> int:
    service = build_edge(config_path)
    service.install_signal_handlers()
    return service.run()
