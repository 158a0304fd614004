"""The gateway agent's TOML config, validated into frozen objects (see docs/configuration.md).

``[data]`` says where rows come from. ``source = "store"`` (a real gateway) names the
bridge's sample store and device and defines the task on its signals (``edge.rows``);
``source = "dataset"`` takes one unit of a packaged or CSV data set (demo, benchmarks).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edge.privacy import LEVELS, PrivacyPolicy
from edge.rows import TASKS, RowSpec, parse_exclusion, parse_feature
from fedcore.config import Section, load_toml
from fedcore.service_config import BrokerConfig, broker_config, name

DAY = 86400.0
SPOOL_MAX_ENTRIES = 1000
SPOOL_MAX_BYTES = 64 * 1024 * 1024
SPOOL_MIN_BYTES = 64 * 1024  # below this not even one small update fits


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    """``[spool]``: the bounds of ``state_dir/spool.bin``, the unsent messages (edge.spool).
    When full, the oldest message is dropped (counted, logged)."""

    max_entries: int = SPOOL_MAX_ENTRIES
    max_bytes: int = SPOOL_MAX_BYTES


@dataclass(frozen=True, slots=True)
class DataConfig:
    source: str = "dataset"  # "dataset": a bundled/CSV data set; "store": the bridge's sample store
    # source = "dataset"
    dataset: str = "wind"
    unit: str = ""
    gateways: int = 0  # how the data set is partitioned (0 = its natural default)
    max_rows_per_unit: int = 0
    first_row: int = 0  # wind rows [first_row, first_row + num_rows); 0 rows = all
    num_rows: int = 0
    unit_column: str = ""
    target: str = ""
    features: tuple[str, ...] = ()
    task: str = ""
    # source = "store"
    store: Path | None = None
    device: str = ""  # the bridge's [[device]] name whose rows this gateway reads
    rows: RowSpec | None = None


@dataclass(frozen=True, slots=True)
class EdgeConfig:
    file: str
    device: str
    fleet: str
    task: str
    broker: BrokerConfig
    data: DataConfig
    state_dir: Path
    seed: int = 0
    inference: bool = False
    keep_models: int = 3  # exported .tflite files kept in state_dir/models
    status_interval_s: float = 60.0  # the retained status is refreshed at least this often
    metrics_port: int = 0  # Prometheus exporter; 0 = off
    metrics_addr: str = "127.0.0.1"
    trace: bool = False  # step timestamps to state_dir/trace.jsonl (fedcore.trace)
    attack: str = ""  # for attack experiments only: name of edge.attacks' attack
    security: dict[str, Path] = field(default_factory=dict)
    spool: SpoolConfig = SpoolConfig()
    privacy: PrivacyPolicy = PrivacyPolicy()


def _attack(sec: Section) -> str:
    from edge.attacks import ATTACKS

    value = sec.str("attack", "")
    if value and value not in ATTACKS:
        raise sec.error("attack", value, f"unknown attack; known: {', '.join(sorted(ATTACKS))}")
    return value


def load_edge_config(path: str | Path) -> EdgeConfig:
    root = load_toml(path)
    dev = root.section("device", required=True)
    device = name(dev, "id")
    fleet, task = name(dev, "fleet"), name(dev, "task")
    dev.reject_unknown()
    broker = broker_config(root.section("broker"), device)
    dsec = root.section("data", required=True)
    source = dsec.str("source", "dataset", choices=("dataset", "store"))
    data = _store_data(dsec) if source == "store" else _dataset_data(dsec)
    state = root.section("state")
    inference = root.section("inference")
    experiment = root.section("experiment")  # attack experiments; never on a real gateway
    sec = root.section("security")
    security = {k: sec.path(k) for k in ("keyring", "signing_key", "revocations") if sec.has(k)}
    sec.reject_unknown()
    spool = root.section("spool")
    spool_config = SpoolConfig(
        max_entries=spool.int("max_entries", SPOOL_MAX_ENTRIES, min=1),
        max_bytes=spool.int("max_bytes", SPOOL_MAX_BYTES, min=SPOOL_MIN_BYTES),
    )
    spool.reject_unknown()
    privacy = _privacy(root.section("privacy"))
    cfg = EdgeConfig(
        file=str(path),
        device=device,
        fleet=fleet,
        task=task,
        broker=broker,
        data=data,
        state_dir=state.path("dir", f"edge-state-{device}"),
        seed=state.int("seed", 0),
        status_interval_s=state.float("status_interval_s", 60.0, min=1.0),
        metrics_port=state.int("metrics_port", 0, min=0, max=65535),
        metrics_addr=state.str("metrics_addr", "127.0.0.1"),
        trace=state.bool("trace", False),
        inference=inference.bool("enabled", False),
        keep_models=inference.int("keep_models", 3, min=1),
        attack=_attack(experiment),
        security=security,
        spool=spool_config,
        privacy=privacy,
    )
    state.reject_unknown()
    inference.reject_unknown()
    experiment.reject_unknown()
    root.reject_unknown()
    return cfg


def _privacy(sec: Section) -> PrivacyPolicy:
    """``[privacy]``: the DP this gateway requires of every round, whatever is announced."""
    policy = PrivacyPolicy(
        require=sec.str("require", "none", choices=LEVELS),
        min_noise_multiplier=sec.float("min_noise_multiplier", 0.0, min=0.0),
        max_epsilon=sec.float("max_epsilon", 0.0, min=0.0),
        delta=sec.float("delta", 1e-5, min=1e-300, max=0.5),
    )
    if not policy.active:  # a bound on a level not required would silently do nothing
        for key in ("min_noise_multiplier", "max_epsilon"):
            if getattr(policy, key) > 0:
                raise sec.error(key, getattr(policy, key), 'needs require = "update" or "record"')
    sec.reject_unknown()
    return policy


def _dataset_data(dsec: Section) -> DataConfig:
    data = DataConfig(
        source="dataset",
        dataset=dsec.str("dataset", "wind"),
        unit=dsec.str("unit", ""),
        gateways=dsec.int("gateways", 0, min=0),
        max_rows_per_unit=dsec.int("max_rows_per_unit", 0, min=0),
        first_row=dsec.int("first_row", 0, min=0),
        num_rows=dsec.int("num_rows", 0, min=0),
        unit_column=dsec.str("unit_column", ""),
        target=dsec.str("target", ""),
        features=dsec.str_list("features", []),
        task=dsec.str("task", ""),
    )
    if not data.unit:
        raise dsec.error("unit", None, "required with source = \"dataset\" (which unit this gateway holds)")
    dsec.reject_unknown()
    return data


def _store_data(dsec: Section) -> DataConfig:
    if dsec.has("scaler"):
        raise dsec.error("scaler", dsec.data["scaler"], "the fleet scaler now comes from the "
                         "aggregator (federated statistics, [model] scaling = \"federated\"); "
                         "remove [data.scaler]")
    if not dsec.str("store"):
        raise dsec.error("store", "", "the bridge's sample store file (its [bridge] store)")
    store = dsec.path("store")
    device = dsec.str("device")
    if not device:
        raise dsec.error("device", device, "the bridge's [[device]] name whose rows to read")
    task = dsec.str("task", "regression", choices=TASKS)
    features = dsec.str_list("features")
    parsed = []
    for text in features:
        try:
            parsed.append(parse_feature(text))
        except ValueError as exc:
            raise dsec.error("features", list(features), str(exc)) from None
    if not parsed:
        raise dsec.error("features", [], "name at least one signal")
    target = dsec.str("target", "")
    if task != "anomaly" and not target:
        raise dsec.error("target", target, f"required for task = \"{task}\" (the signal to predict)")
    if task == "anomaly" and target:
        raise dsec.error("target", target, "task = \"anomaly\" trains an autoencoder on the "
                         "features; it has no target")
    exclude = []
    for text in dsec.str_list("exclude_when", []):
        try:
            exclude.append(parse_exclusion(text))
        except ValueError as exc:
            raise dsec.error("exclude_when", text, str(exc)) from None
    try:
        rows = RowSpec(
            task=task,
            features=tuple(parsed),
            target=target,
            time_signal=dsec.str("time_signal", ""),
            record_signal=dsec.str("record_signal", ""),
            resample_s=dsec.float("resample_s", 0.0, min=0.0),
            aggregate=dsec.str("aggregate", "mean", choices=("mean", "last", "min", "max")),
            fill_gap_s=dsec.float("fill_gap_s", 0.0, min=0.0),
            valid=_valid_ranges(dsec),
            exclude=tuple(exclude),
            holdout_every=dsec.int("holdout_every", 5, min=0),
            holdout_block_s=dsec.float("holdout_block_s", DAY, min=1.0),
            holdout_origin_s=dsec.float("holdout_origin_s", 0.0),
            embargo_s=dsec.float("embargo_s", 0.0, min=0.0),
            window_rows=dsec.int("window_rows", 50_000, min=10),
            window_s=dsec.float("window_days", 0.0, min=0.0) * DAY,
            min_rows=dsec.int("min_rows", 200, min=1),
        )
    except ValueError as exc:  # RowSpec's own checks: the task and its target
        raise dsec.error("target" if "target" in str(exc) else "task", target or task, str(exc)) from None
    if rows.holdout_every == 1:
        raise dsec.error("holdout_every", 1, "would hold out every block: use 0 (no holdout) or >= 2")
    if rows.holdout_every and rows.embargo_s >= (rows.holdout_every - 1) * rows.holdout_block_s / 2:
        raise dsec.error("embargo_s", rows.embargo_s, "leaves no training row between two "
                         "holdout blocks: make it shorter than the training blocks")
    trainable = rows.window_rows * ((rows.holdout_every - 1) / rows.holdout_every if rows.holdout_every else 1)
    if rows.min_rows > trainable:
        raise dsec.error("min_rows", rows.min_rows, f"can never be reached: window_rows = "
                         f"{rows.window_rows} leaves at most {int(trainable)} training rows")
    dsec.reject_unknown()
    return DataConfig(source="store", store=store, device=device, rows=rows)


def _valid_ranges(dsec: Section) -> tuple[tuple[str, float, float], ...]:
    sec = dsec.section("valid")
    out = []
    for signal, value in sec.data.items():
        if (not isinstance(value, list) or len(value) != 2 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in value)
                or not value[0] <= value[1]):
            raise sec.error(signal, value, "must be [low, high] with low <= high")
        out.append((signal, float(value[0]), float(value[1])))
    return tuple(out)
