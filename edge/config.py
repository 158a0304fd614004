"""The gateway agent's TOML config, validated into frozen objects (see docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.config import Section, load_toml
from fedcore.service_config import BrokerConfig, broker_config, name


@dataclass(frozen=True, slots=True)
class ScalerConfig:
    """The fleet's feature/target standardisation, shipped to every gateway ([data.scaler]).

    A shared model needs every gateway to scale alike; one gateway's own rows cannot give
    the fleet's statistics (docs/decisions.md)."""

    feature_mean: tuple[float, ...]
    feature_std: tuple[float, ...]
    target_mean: float = 0.0
    target_std: float = 1.0


@dataclass(frozen=True, slots=True)
class DataConfig:
    source: str = "dataset"  # "dataset": a bundled/CSV data set; "store": the field-bus sample store
    dataset: str = "wind"
    unit: str = ""
    gateways: int = 0  # how the data set is partitioned (0 = its natural default)
    max_rows_per_unit: int = 0
    store: Path | None = None
    device: str = ""  # source = "store": the bridge's device name whose rows this gateway reads
    first_row: int = 0  # wind rows / store records [first_row, first_row + num_rows); 0 rows = all
    num_rows: int = 0
    scaler: ScalerConfig | None = None
    unit_column: str = ""
    target: str = ""
    features: tuple[str, ...] = ()
    task: str = ""


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
    attack: str = ""  # for attack experiments only: name of edge.attacks' attack
    security: dict[str, Path] = field(default_factory=dict)


def _attack(sec: Section) -> str:
    from edge.attacks import ATTACKS

    name = sec.str("attack", "")
    if name and name not in ATTACKS:
        raise sec.error("attack", name, f"unknown attack; known: {', '.join(sorted(ATTACKS))}")
    return name


def load_edge_config(path: str | Path) -> EdgeConfig:
    root = load_toml(path)
    dev = root.section("device", required=True)
    device = name(dev, "id")
    fleet, task = name(dev, "fleet"), name(dev, "task")
    dev.reject_unknown()
    broker = broker_config(root.section("broker"), device)
    dsec = root.section("data", required=True)
    source = dsec.str("source", "dataset", choices=("dataset", "store"))
    data = DataConfig(
        source=source,
        dataset=dsec.str("dataset", "wind"),
        unit=dsec.str("unit", ""),
        gateways=dsec.int("gateways", 0, min=0),
        max_rows_per_unit=dsec.int("max_rows_per_unit", 0, min=0),
        store=dsec.path("store") if dsec.has("store") else None,
        device=dsec.str("device", ""),
        first_row=dsec.int("first_row", 0, min=0),
        num_rows=dsec.int("num_rows", 0, min=0),
        scaler=_scaler(dsec) if dsec.has("scaler") else None,
        unit_column=dsec.str("unit_column", ""),
        target=dsec.str("target", ""),
        features=dsec.str_list("features", []),
        task=dsec.str("task", ""),
    )
    if source == "dataset" and not data.unit:
        raise dsec.error("unit", None, "required with source = \"dataset\" (which unit this gateway holds)")
    if source == "store" and data.store is None:
        raise dsec.error("store", None, "required with source = \"store\" (the bridge's sample store file)")
    if source == "store" and not data.device:
        raise dsec.error("device", None, "required with source = \"store\" (the [[device]] name in the bridge config)")
    if source == "store" and data.scaler is None:
        raise dsec.error("scaler", None, "required with source = \"store\": the fleet's [data.scaler] "
                         "(feature_mean, feature_std, target_mean, target_std)")
    if source == "dataset" and data.scaler is not None:
        raise dsec.error("scaler", None, "only with source = \"store\" (a data set fits its own scaler)")
    if source == "store" and data.dataset != "wind":
        raise dsec.error("dataset", data.dataset, "the store source knows the wind turbine map only")
    dsec.reject_unknown()
    state = root.section("state")
    inference = root.section("inference")
    experiment = root.section("experiment")  # attack experiments; never on a real gateway
    sec = root.section("security")
    security = {k: sec.path(k) for k in ("keyring", "signing_key", "revocations") if sec.has(k)}
    sec.reject_unknown()
    cfg = EdgeConfig(
        file=str(path),
        device=device,
        fleet=fleet,
        task=task,
        broker=broker,
        data=data,
        state_dir=state.path("dir", f"edge-state-{device}"),
        seed=state.int("seed", 0),
        inference=inference.bool("enabled", False),
        attack=_attack(experiment),
        security=security,
    )
    state.reject_unknown()
    inference.reject_unknown()
    experiment.reject_unknown()
    root.reject_unknown()
    return cfg


def _scaler(dsec: Section) -> ScalerConfig:
    sec = dsec.section("scaler")
    mean, std = _floats(sec, "feature_mean"), _floats(sec, "feature_std")
    if len(mean) != len(std):
        raise sec.error("feature_std", list(std), f"needs {len(mean)} values, like feature_mean")
    if any(not v > 0 for v in std):
        raise sec.error("feature_std", list(std), "every value must be > 0")
    out = ScalerConfig(mean, std, sec.float("target_mean", 0.0), sec.float("target_std", 1.0, min=1e-12))
    sec.reject_unknown(("feature_mean", "feature_std", "target_mean", "target_std"))
    return out


def _floats(sec: Section, name: str) -> tuple[float, ...]:
    value = sec.data.get(name)
    if not isinstance(value, list) or not value or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in value
    ):
        raise sec.error(name, value, "must be a non-empty list of numbers")
    return tuple(float(v) for v in value)
