"""Assemble and run the aggregator service from its config file (`fedgate aggregator run`)."""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path

import msgspec
import numpy as np

from aggregator import checkpoint as checkpoints
from aggregator.config import AggregatorConfig, load_aggregator_config
from aggregator.fusion import ServerUpdateFn
from aggregator.rounds import IncompatibleState, Ledger
from aggregator.runtime import AggregatorService
from aggregator.security import AggregatorSecurity
from fedcore.errors import ConfigError
from fedcore.protocol import codec
from fedcore.systemd import SystemdNotifier
from fedcore.trace import tracer
from fedcore.transport.factory import transport_from_config
from fedcore.transport.tls import check_identity

log = logging.getLogger("fedgate.aggregator")


def with_calibrated_noise(config: AggregatorConfig) -> AggregatorConfig:
    """Turn a target (epsilon, delta) into the noise multiplier the gateways apply."""
    target = config.privacy
    if target.target_epsilon <= 0:
        return config
    if target.level == "record":
        return _with_record_noise(config)
    from aggregator.privacy import noise_multiplier_for

    q = min(1.0, config.rounds.fraction)
    z = noise_multiplier_for(target.target_epsilon, target.delta, config.rounds.rounds, q)
    log.info("DP: noise multiplier %.3f for epsilon %.3g, delta %.3g over %d rounds",
             z, target.target_epsilon, target.delta, config.rounds.rounds)
    pipeline = msgspec.structs.replace(config.rounds.pipeline, noise_multiplier=z)
    return replace(config, rounds=replace(config.rounds, pipeline=pipeline))


def _with_record_noise(config: AggregatorConfig) -> AggregatorConfig:
    """Record level: DP-SGD on the gateways; sigma for the target over every local step of
    the run, with ``min_records`` standing in for the gateways' unknown data sizes."""
    from aggregator.privacy import record_noise_multiplier_for

    target = config.privacy
    train = msgspec.structs.replace(config.rounds.train, dp_clip=target.record_clip)
    z = record_noise_multiplier_for(target.target_epsilon, target.delta, train,
                                    config.rounds.rounds, target.min_records)
    log.info("DP (record level): DP-SGD sigma %.3f, clip %.3g for epsilon %.3g, delta %.3g over "
             "%d rounds, calibrated for >= %d records per gateway", z, target.record_clip,
             target.target_epsilon, target.delta, config.rounds.rounds, target.min_records)
    train = msgspec.structs.replace(train, dp_noise=z)
    return replace(config, rounds=replace(config.rounds, train=train))


def make_ledger(config: AggregatorConfig) -> Ledger | None:
    record = config.rounds.train.dp_noise > 0
    if config.rounds.pipeline.noise_multiplier <= 0 and not record:
        return None
    from aggregator.privacy import PrivacyLedger

    eps = config.privacy.target_epsilon or float("inf")
    return PrivacyLedger(eps, config.privacy.delta, config.privacy.policy,
                         level="record" if record else "update")


def root_update(config: AggregatorConfig) -> ServerUpdateFn | None:
    """FLTrust's reference: one round of local training on the aggregator's root data."""
    path = config.fusion.root_data
    if path is None:
        return None
    from fedcore.learning.params import subtract
    from fedcore.learning.training import train_local

    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"], np.float32), np.asarray(data["y"])
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError(config.file, "fusion.root_data", str(path),
                          f"cannot read arrays x and y: {exc}") from None
    rng = np.random.default_rng([config.seed, 3])

    def update(held: list[np.ndarray]) -> list[np.ndarray]:
        trained, _ = train_local(config.spec, held, x, y, config.rounds.train, rng)
        return subtract(trained, held)

    log.info("FLTrust: %d root rows from %s", len(x), path)
    return update


def build_aggregator(config_path: str | Path) -> AggregatorService:
    config = with_calibrated_noise(load_aggregator_config(config_path))
    if config.broker.url.startswith("mqtts://"):
        check_identity(config.broker.cert_file, config.file,
                       [("broker.client_id", config.broker.client_id)])
    try:  # held until the process ends: one aggregator per state folder
        checkpoints.StateLock(config.state_dir).acquire()
    except checkpoints.StateInUse as exc:
        raise ConfigError(config.file, "state.dir", str(config.state_dir), str(exc)) from None
    except OSError as exc:
        raise ConfigError(config.file, "state.dir", str(config.state_dir),
                          f"cannot use the state folder: {exc.strerror or exc}") from None
    transport = transport_from_config(config.broker)
    security = AggregatorSecurity.from_paths(config.file, config.security, config.state_dir / "audit.jsonl",
                                             codec.Limits(max_message_bytes=config.broker.max_message))
    metrics = None
    if config.metrics_port:
        from aggregator.metrics import AggregatorMetrics

        try:
            metrics = AggregatorMetrics(config.metrics_port, config.metrics_addr)
        except OSError as exc:
            raise ConfigError(config.file, "state.metrics_port", config.metrics_port,
                              f"cannot listen on {config.metrics_addr}:{config.metrics_port}: "
                              f"{exc.strerror or exc}") from None
    try:
        return AggregatorService(config, transport, security, ledger=make_ledger(config),
                                 server_update=root_update(config),
                                 notifier=SystemdNotifier.from_environment(), metrics=metrics,
                                 trace=tracer(config.trace, config.state_dir))
    except checkpoints.DamagedCheckpoint as exc:
        if metrics is not None:
            metrics.close()
        raise ConfigError(config.file, "state.dir", str(config.state_dir),
                          f"the saved state cannot be read ({exc}); move it aside with "
                          f"`fedgate aggregator new-lineage -c {config.file}` to start a new "
                          "lineage, or restore it from a backup") from None
    except IncompatibleState as exc:
        if metrics is not None:
            metrics.close()
        raise ConfigError(config.file, f"model.{exc.key}" if exc.key else "model", exc.value,
                          f"differs from the state in {config.state_dir}: {exc}; to train the new "
                          f"model as a new lineage run `fedgate aggregator new-lineage -c "
                          f"{config.file}` (the old state is archived, not deleted), or restore "
                          "the old [model]") from None


def new_lineage(config_path: str | Path) -> Path | None:
    """Archive the aggregator's state so that its next start opens a new lineage. Returns
    the archive folder (None when there was no state). The audit log stays in place: its
    hash chain spans lineages."""
    config = load_aggregator_config(config_path)
    state = config.state_dir
    try:
        lock = checkpoints.StateLock(state).acquire()
    except checkpoints.StateInUse as exc:
        raise ConfigError(config.file, "state.dir", str(state), f"{exc}: stop it first") from None
    try:
        return _archive(state)
    finally:
        lock.release()


def _archive(state: Path) -> Path | None:
    try:
        saved = checkpoints.load(state)
        lineage = str(saved.meta.get("lineage") or "before-lineages") if saved else ""
    except checkpoints.DamagedCheckpoint:  # archived as it is
        lineage = time.strftime("damaged-%Y%m%dT%H%M%SZ", time.gmtime())
    if not lineage:
        return None
    archive = state / "lineages" / lineage
    n = 1
    while archive.exists():  # archived before (a restored backup, a second run): keep both
        n += 1
        archive = state / "lineages" / f"{lineage}.{n}"
    archive.mkdir(parents=True)
    for name in ("models", checkpoints.JOURNAL, checkpoints.FILE):  # the checkpoint last: a half-done run is redone
        if (state / name).exists():
            (state / name).rename(archive / name)
    return archive


def run_aggregator(config_path: str | Path) -> int:
    service = build_aggregator(config_path)
    service.install_signal_handlers()
    return service.run()
