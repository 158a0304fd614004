"""The aggregator's TOML config, validated into frozen objects (see docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aggregator.buffered import MODES, BufferedConfig
from aggregator.deployment import POLICIES, DeployConfig
from aggregator.reputation import ReputationConfig
from aggregator.rounds import RoundConfig
from aggregator.schedule import Schedule, check_timezone, parse_window
from aggregator.server_optim import SERVER_OPTIMIZERS, ServerOptimizerConfig
from fedcore.compression.downlink import MODES as DOWNLINK_MODES
from fedcore.config import Section, load_toml
from fedcore.protocol.messages import ModelSpec
from fedcore.service_config import (
    BrokerConfig,
    broker_config,
    model_spec,
    name,
    pipeline_config,
    train_config,
)


@dataclass(frozen=True, slots=True)
class FusionConfig:
    rule: str = "fedavg"
    params: dict[str, Any] = field(default_factory=dict)
    root_data: Path | None = None  # FLTrust: the aggregator's small trusted data set (.npz x, y)


@dataclass(frozen=True, slots=True)
class PrivacyTarget:
    target_epsilon: float = 0.0  # 0 = no DP calibration
    delta: float = 1e-5
    policy: str = "stop"  # what happens when a gateway's budget is spent: stop | warn
    # "update": clip + noise the whole delta (unit: a gateway's data); "record": DP-SGD on the
    # gateway (unit: one record), target_epsilon then calibrates train.dp_noise (docs/privacy.md)
    level: str = "update"
    min_records: int = 1000  # lower bound on a gateway's records, for calibrating before round 1
    record_clip: float = 1.0  # per-example gradient clip norm at level "record"


@dataclass(frozen=True, slots=True)
class AggregatorConfig:
    file: str
    broker: BrokerConfig
    fleet: str
    task: str
    spec: ModelSpec
    rounds: RoundConfig
    fusion: FusionConfig
    privacy: PrivacyTarget
    state_dir: Path
    seed: int = 0
    exit_when_done: bool = False
    metrics_port: int = 0  # Prometheus exporter; 0 = off
    metrics_addr: str = "127.0.0.1"
    keep_models: int = 50  # model files kept in state_dir/models (deployed ones always)
    trace: bool = False  # step timestamps to state_dir/trace.jsonl (fedcore.trace)
    deploy: DeployConfig = DeployConfig()
    security: dict[str, Path] = field(default_factory=dict)


def load_aggregator_config(path: str | Path) -> AggregatorConfig:
    root = load_toml(path)
    task = root.section("task", required=True)
    fleet, task_name = name(task, "fleet"), name(task, "name", what="task")
    task.reject_unknown()
    broker = broker_config(root.section("broker"), "aggregator")
    msec = root.section("model", required=True)
    scaling = msec.str("scaling", "federated", choices=("federated", "none"))
    spec = model_spec(msec)
    if scaling == "federated" and not spec.features:
        raise msec.error("features", [], "scaling = \"federated\" needs the feature names (the "
                         "gateways' [data] features); or set scaling = \"none\" for pre-scaled rows")
    if scaling == "federated" and len(spec.features) != spec.layer_sizes[0]:
        raise msec.error("features", list(spec.features),
                         f"{len(spec.features)} features, but layer_sizes starts with {spec.layer_sizes[0]}")
    if scaling == "federated" and spec.task == "regression" and not spec.target:
        raise msec.error("target", "", "regression with scaling = \"federated\" needs the target's name")
    rsec = root.section("rounds")
    state = root.section("state")
    server_sec = root.section("server")
    server = ServerOptimizerConfig(
        name=server_sec.str("optimizer", "fedavg", choices=SERVER_OPTIMIZERS),
        learning_rate=server_sec.float("learning_rate", 1.0, min=0.0),
        momentum=server_sec.float("momentum", 0.9, min=0.0, max=1.0),
        beta1=server_sec.float("beta1", 0.9, min=0.0, max=1.0),
        beta2=server_sec.float("beta2", 0.99, min=0.0, max=1.0),
        tau=server_sec.float("tau", 1e-3, min=0.0),
    )
    server_sec.reject_unknown()
    psec = root.section("pipeline")
    pipeline = pipeline_config(psec)
    privacy = PrivacyTarget(
        target_epsilon=psec.float("target_epsilon", 0.0, min=0.0),
        delta=psec.float("delta", 1e-5, min=0.0, max=0.1),
        policy=psec.str("budget_policy", "stop", choices=("stop", "warn")),
        level=psec.str("dp_level", "update", choices=("update", "record")),
        min_records=psec.int("min_records", 1000, min=1),
        record_clip=psec.float("record_clip", 1.0, min=0.0),
    )
    if privacy.level == "record":
        if privacy.target_epsilon <= 0:
            raise psec.error("dp_level", "record", "needs target_epsilon > 0 (it calibrates the DP-SGD noise)")
        if privacy.record_clip <= 0:
            raise psec.error("record_clip", privacy.record_clip, "must be > 0")
        if pipeline.noise_multiplier > 0:
            raise psec.error("noise_multiplier", pipeline.noise_multiplier,
                             "is update-level noise; with dp_level = \"record\" leave it 0")
    elif privacy.target_epsilon > 0 and pipeline.clip_norm <= 0:
        raise psec.error("target_epsilon", privacy.target_epsilon, "needs clip_norm > 0")
    psec.reject_unknown()
    reputation = _reputation(root.section("reputation"))
    rounds = RoundConfig(
        rounds=rsec.int("rounds", 10, min=0),
        min_participants=rsec.int("min_participants", 1, min=1),
        round_timeout_s=rsec.float("round_timeout_s", 60.0, min=0.1),
        fraction=rsec.float("fraction", 1.0, min=0.0, max=1.0),
        max_update_norm=rsec.float("max_update_norm", 0.0, min=0.0),
        max_sample_share=rsec.float("max_sample_share", 0.0, min=0.0, max=1.0),
        straggler_factor=rsec.float("straggler_factor", 2.0, min=0.0),
        straggler_min_s=rsec.float("straggler_min_s", 5.0, min=0.0),
        train=train_config(root.section("train")),
        pipeline=pipeline,
        server=server,
        reputation=reputation,
        downlink=rsec.str("downlink", "fp32", choices=DOWNLINK_MODES),
        downlink_full_every=rsec.int("downlink_full_every", 10, min=0),
        schedule=_schedule(root.section("schedule")),
        scaling=scaling,
        keep_history=state.int("keep_history", 1000, min=10),
        mode=rsec.str("mode", "sync", choices=MODES),
        buffered=_buffered(rsec),
    )
    rsec.reject_unknown()
    fsec = root.section("fusion")
    fusion = FusionConfig(
        rule=fsec.str("rule", "fedavg"),
        params={k: v for k, v in fsec.data.items() if k not in ("rule", "root_data")},
        root_data=fsec.path("root_data") if fsec.has("root_data") else None,
    )
    if rounds.mode == "buffered":
        _check_buffered(rsec, fsec, root.section("schedule"), rounds, fusion)
    cfg = AggregatorConfig(
        file=str(path),
        broker=broker,
        fleet=fleet,
        task=task_name,
        spec=spec,
        rounds=rounds,
        fusion=fusion,
        privacy=privacy,
        state_dir=state.path("dir", "aggregator-state"),
        seed=state.int("seed", 0),
        exit_when_done=state.bool("exit_when_done", False),
        metrics_port=state.int("metrics_port", 0, min=0, max=65535),
        metrics_addr=state.str("metrics_addr", "127.0.0.1"),
        keep_models=state.int("keep_models", 50, min=2),
        trace=state.bool("trace", False),
        deploy=_deploy(root.section("deploy")),
        security=_security(root.section("security")),
    )
    state.reject_unknown()
    root.reject_unknown()
    _check_fusion(fsec, fusion)
    return cfg


BUFFERED_KEYS = ("buffer_size", "max_staleness", "staleness_exponent", "min_interval_s")
# Rules that fuse a weighted mean: a staleness-discounted delta keeps its meaning. Rank and
# distance rules (median, trimmed mean, Krum, geometric median) and FLTrust judge one round's
# cohort against itself or the server's fresh reference; a buffer mixes bases.
BUFFERED_RULES = ("fedavg", "norm_bound")


def _buffered(sec: Section) -> BufferedConfig:
    mode = sec.data.get("mode", "sync")
    if mode != "buffered":
        for key in BUFFERED_KEYS:
            if sec.has(key):
                raise sec.error(key, sec.data[key], 'is for mode = "buffered" only')
        return BufferedConfig()
    return BufferedConfig(
        buffer_size=sec.int("buffer_size", 10, min=1),
        max_staleness=sec.int("max_staleness", 5, min=0),
        staleness_exponent=sec.float("staleness_exponent", 0.5, min=0.0, max=4.0),
        min_interval_s=sec.float("min_interval_s", 5.0, min=0.0),
    )


def _check_buffered(rsec: Section, fsec: Section, ssec: Section, rounds: RoundConfig,
                    fusion: FusionConfig) -> None:
    """What buffered rounds refuse, at config check (docs/configuration.md, [rounds])."""
    if rounds.min_participants > rounds.buffered.buffer_size:
        raise rsec.error("min_participants", rounds.min_participants,
                         f"must be <= buffer_size ({rounds.buffered.buffer_size}) in buffered mode")
    if rounds.fraction < 1.0:
        raise rsec.error("fraction", rounds.fraction, "selects a cohort per round; buffered mode "
                         "takes every online gateway's update (leave it 1.0)")
    if fusion.rule not in BUFFERED_RULES:
        raise fsec.error("rule", fusion.rule, "needs one round's whole cohort; buffered mode "
                         f"supports {', '.join(BUFFERED_RULES)}")
    if rounds.schedule != Schedule():
        key = next(k for k in ("interval_s", "windows", "timezone", "min_new_rows") if ssec.has(k))
        raise ssec.error(key, ssec.data[key], "schedules synchronous rounds; buffered mode runs "
                         "continuously (gateways send when their link is up)")


def _reputation(sec: Section) -> ReputationConfig | None:
    # Off unless asked for: on non-IID real data (the battery cells) an honest, unusual
    # gateway crossed the default outlier ratio often enough to be quarantined.
    enabled = sec.bool("enabled", False)
    cfg = ReputationConfig(
        outlier_ratio=sec.float("outlier_ratio", 3.0),
        window=sec.int("window", 5),
        quarantine_after=sec.int("quarantine_after", 3),
        smoothing=sec.float("smoothing", 0.3),
        min_updates=sec.int("min_updates", 3),
    )
    try:
        cfg.check()
    except ValueError as exc:
        field = str(exc).split()[1]  # "reputation NAME = VALUE must be ..."
        raise sec.error(field, getattr(cfg, field, None), str(exc)) from None
    sec.reject_unknown()
    return cfg if enabled else None


def _schedule(sec: Section) -> Schedule:
    windows = []
    for text in sec.str_list("windows", []):
        try:
            windows.append(parse_window(text))
        except ValueError as exc:
            raise sec.error("windows", text, str(exc)) from None
    timezone = sec.str("timezone", "UTC")
    try:
        check_timezone(timezone)
    except ValueError as exc:
        raise sec.error("timezone", timezone, str(exc)) from None
    out = Schedule(
        interval_s=sec.float("interval_s", 0.0, min=0.0),
        windows=tuple(windows),
        timezone=timezone,
        min_new_rows=sec.int("min_new_rows", 0, min=0),
    )
    sec.reject_unknown()
    return out


def _deploy(sec: Section) -> DeployConfig:
    out = DeployConfig(
        policy=sec.str("policy", "latest", choices=POLICIES),
        every=sec.int("every", 1, min=1),
        canary_fraction=sec.float("canary_fraction", 0.25, min=0.0, max=1.0),
        max_regression=sec.float("max_regression", 0.02, min=0.0),
        canary_timeout_s=sec.float("canary_timeout_s", 300.0, min=1.0),
    )
    sec.reject_unknown()
    return out


def _security(sec: Section) -> dict[str, Path]:
    out = {k: sec.path(k) for k in ("keyring", "signing_key", "revocations") if sec.has(k)}
    sec.reject_unknown()
    return out


def _check_fusion(sec: Section, fusion: FusionConfig) -> None:
    """Ask the fusion registry whether the rule and its parameters exist."""
    from aggregator.fusion import check_rule, needs_root_data

    try:
        check_rule(fusion.rule, fusion.params)
    except ValueError as exc:
        raise sec.error("rule", fusion.rule, str(exc)) from None
    if needs_root_data(fusion.rule) and fusion.root_data is None:
        raise sec.error("root_data", None, f"rule {fusion.rule!r} needs the aggregator's trusted "
                        "root data set: an .npz file with arrays x and y, scaled like the gateways'")
