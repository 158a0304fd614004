"""The gateway agent's TOML config, validated into frozen objects (see docs/configuration.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedcore.config import load_toml
from fedcore.service_config import BrokerConfig, broker_config, name


@dataclass(frozen=True, slots=True)
class DataConfig:
    source: str = "dataset"  # "dataset": a bundled/CSV data set; "store": the field-bus sample store
    dataset: str = "wind"
    unit: str = ""
    gateways: int = 0  # how the data set is partitioned (0 = its natural default)
    max_rows_per_unit: int = 0
    store: Path | None = None
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
        unit_column=dsec.str("unit_column", ""),
        target=dsec.str("target", ""),
        features=dsec.str_list("features", []),
        task=dsec.str("task", ""),
    )
    if source == "dataset" and not data.unit:
        raise dsec.error("unit", None, "required with source = \"dataset\" (which unit this gateway holds)")
    if source == "store" and data.store is None:
        raise dsec.error("store", None, "required with source = \"store\" (the bridge's sample store file)")
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
        attack=experiment.str("attack", ""),
        security=security,
    )
    state.reject_unknown()
    inference.reject_unknown()
    experiment.reject_unknown()
    root.reject_unknown()
    return cfg
