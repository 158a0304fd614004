"""The demo's options and the service config files it writes (the same TOML an operator writes)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.fusion import needs_root_data
from fedcore.datasets import FederatedDataset
from fedcore.errors import FedgateError
from fedcore.protocol.messages import ModelSpec, TrainConfig


@dataclass(frozen=True)
class DemoOptions:
    dataset: str = "wind"
    gateways: int = 0  # 0 = one per natural unit of the data set
    rounds: int = 20
    out: str | None = None
    broker: str | None = None
    workdir: str | None = None
    seed: int = 0
    fleet: str = "demo"
    task: str = ""  # "" = a fresh name per run (see run_demo)
    max_rows_per_unit: int = 0
    round_timeout_s: float = 60.0
    timeout_s: float = 900.0
    train: TrainConfig | None = None
    fusion: str = "fedavg"
    server_optimizer: str = "fedavg"
    compression: tuple[str, ...] = ()
    clip_norm: float = 0.0
    dp_epsilon: float = 0.0
    dp_level: str = "update"  # "update": noise each gateway's delta; "record": DP-SGD per record
    downlink: str = "fp32"  # how the global model travels: fp32 | int8 | delta
    unit_column: str = ""
    target: str = ""
    features: tuple[str, ...] = ()
    csv_task: str = ""
    metric: str = ""  # headline metric; "" = the task's default (f1_pos for a rare binary event)
    attack: str = ""  # attack experiments: what the malicious gateways do
    malicious: float = 0.0  # share of gateways that are malicious
    qat: bool = False  # quantization-aware local training
    inference: bool = False  # gateways run each new model as int8 .tflite in LiteRT
    secure: bool = False  # provision a fleet: mTLS + generated ACL + signed messages
    trace: bool = False  # every service writes round step timestamps (bench/bench_latency.py)
    # Field bus (wind only): "" off; "modbus": rows cross simulated Modbus devices, bridges
    # and stores before training; "direct": the same rows read from the data set (comparison).
    field_bus: str = ""
    field_bus_rows: int = 5040  # rows per turbine: 5 weeks = one train/test block cycle
    field_bus_start: int = 0  # first row (record number) replayed
    extra_aggregator_toml: str = ""
    extra_edge_toml: dict[str, str] = field(default_factory=dict)

    def csv_options(self) -> dict[str, Any]:
        if not self.dataset.startswith("csv:"):
            return {}
        return dict(unit_column=self.unit_column or None, target=self.target or None,
                    features=list(self.features) or None, task=self.csv_task or None)

    def describe(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("extra_edge_toml")
        return d


_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")


class DemoFailed(FedgateError):
    """The demo's run did not complete (the message says where its logs are): exit 1."""


@dataclass(frozen=True)
class ConfigFiles:
    aggregator: Path
    edges: dict[str, Path]


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list | tuple):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def _table(name: str, values: dict[str, Any]) -> str:
    lines = [f"[{name}]"] + [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def write_root_data(workdir: Path, dataset: FederatedDataset, seed: int, rows: int = 200) -> Path:
    """FLTrust's trusted root set: a few rows the operator collected and checked, drawn here
    from the pooled training rows (the demo simulates the whole plant)."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([u.x_train for u in dataset.units.values()])
    y = np.concatenate([u.y_train for u in dataset.units.values()])
    pick = rng.choice(len(x), size=min(rows, len(x)), replace=False)
    path = workdir / "root-data.npz"
    np.savez(path, x=x[pick], y=y[pick])
    return path


def malicious_units(units: list[str], options: DemoOptions) -> list[str]:
    """The last round(share x N) units (at least one for a positive share) run the attack."""
    if not options.attack or options.malicious <= 0:
        return []
    count = max(1, round(options.malicious * len(units)))
    return units[len(units) - count:]


def device_id(unit: str) -> str:
    """The gateway id of a data set's unit: ``gw-`` and the unit's name where that is a
    valid name (docs/protocol.md), else its valid characters and a hash of the whole name,
    so that any unit name from a user's table gives a distinct, safe id."""
    name = str(unit)
    base = _UNSAFE.sub("-", name)
    if base == name and len(name) <= 61:
        return f"gw-{name}"
    return f"gw-{base[:50]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"


def _identity_tables(url: str, client_id: str, bundle: Path | None) -> str:
    """The [broker] table, plus [security] when the identity has a provisioned bundle."""
    if bundle is None:
        return _table("broker", {"url": url, "client_id": client_id})
    return _table("broker", {
        "url": url, "client_id": client_id, "ca_file": str(bundle / "ca.crt"),
        "cert_file": str(bundle / "client.crt"), "key_file": str(bundle / "client.key"),
    }) + "\n" + _table("security", {
        "keyring": str(bundle / "keyring.json"), "revocations": str(bundle / "revoked.json"),
        "signing_key": str(bundle / "signing.key"),
    })


def write_configs(workdir: Path, url: str, options: DemoOptions, dataset: FederatedDataset,
                  spec: ModelSpec, train: TrainConfig, fleet_dir: Path | None = None) -> ConfigFiles:
    """Write aggregator.toml and one edge-*.toml per unit. With ``fleet_dir`` (a provisioned
    fleet folder), every service connects with its mTLS certificate and signs its messages."""
    units = list(dataset.units)
    pipeline: dict[str, Any] = {"compression": list(options.compression)}
    record = options.dp_level == "record" and options.dp_epsilon > 0
    if options.clip_norm > 0 or (options.dp_epsilon > 0 and not record):
        pipeline["clip_norm"] = options.clip_norm or 1.0
    if options.dp_epsilon > 0:
        pipeline["target_epsilon"] = options.dp_epsilon
    if record:
        # the demo knows every gateway's row count: the tightest valid calibration bound
        pipeline.update(dp_level="record", min_records=min(u.num_train for u in dataset.units.values()))
    agg = "\n".join([
        "# written by fedgate demo",
        _table("task", {"fleet": options.fleet, "name": options.task or "task"}),
        _identity_tables(url, "aggregator", fleet_dir / "aggregator" if fleet_dir else None),
        _table("model", {"kind": spec.kind, "layer_sizes": list(spec.layer_sizes),
                         "activation": spec.activation, "task": spec.task,
                         **_model_names(options, spec)}),
        # every gateway, less one in ten (at least one) that may fail a round and sit it out
        _table("rounds", {"rounds": options.rounds,
                          "min_participants": max(1, len(units) - max(1, len(units) // 10)),
                          "round_timeout_s": options.round_timeout_s,
                          "downlink": options.downlink}),
        _table("train", {"local_epochs": train.local_epochs, "batch_size": train.batch_size,
                         "learning_rate": train.learning_rate, "optimizer": train.optimizer,
                         "max_steps": train.max_steps, **({"qat": True} if train.qat else {})}),
        _table("pipeline", pipeline),
        _table("fusion", {"rule": options.fusion,
                          **({"root_data": str(write_root_data(workdir, dataset, options.seed))}
                             if needs_root_data(options.fusion) else {})}),
        # attack experiments watch reputations and quarantine persistent outliers
        _table("reputation", {"enabled": True}) if options.attack else "",
        _table("server", {"optimizer": options.server_optimizer}),
        _table("state", {"dir": str(workdir / "aggregator-state"), "seed": options.seed,
                         "exit_when_done": False, **({"trace": True} if options.trace else {})}),
        options.extra_aggregator_toml,
    ])
    agg_path = workdir / "aggregator.toml"
    agg_path.write_text(agg)
    edges: dict[str, Path] = {}
    malicious = malicious_units(units, options)
    for i, unit in enumerate(units):
        device = device_id(unit)
        data: dict[str, Any] = {"source": "dataset", "dataset": options.dataset, "unit": unit}
        tables = ""
        if options.field_bus:
            data, tables = _field_bus_data(workdir, options, unit)
        if options.gateways:
            data["gateways"] = options.gateways
        if options.max_rows_per_unit:
            data["max_rows_per_unit"] = options.max_rows_per_unit
        if options.dataset.startswith("csv:"):
            data.update({k: v for k, v in (("unit_column", options.unit_column),
                                           ("target", options.target),
                                           ("features", list(options.features)),
                                           ("task", options.csv_task)) if v})
        text = "\n".join([
            "# written by fedgate demo",
            _table("device", {"id": device, "fleet": options.fleet, "task": options.task or "task"}),
            _identity_tables(url, device, fleet_dir / "devices" / device if fleet_dir else None),
            _table("data", data),
            tables,
            _table("state", {"dir": str(workdir / f"edge-{device}"), "seed": options.seed + 1 + i,
                             **({"trace": True} if options.trace else {})}),
            _table("experiment", {"attack": options.attack}) if unit in malicious else "",
            _table("inference", {"enabled": True}) if options.inference else "",
            options.extra_edge_toml.get(unit, ""),
        ])
        path = workdir / f"edge-{device}.toml"
        path.write_text(text)
        edges[unit] = path
    return ConfigFiles(agg_path, edges)


def store_path(workdir: Path, unit: str) -> Path:
    """The sample store the field-bus demo's bridge for ``unit`` fills."""
    return workdir / f"store-{device_id(unit)}.db"


# The wind turbine task on the simulated turbine's signals (firmware_bridge/maps/wind_turbine.toml),
# as a field engineer writes it in edge.toml (examples/edge.toml): the same features, cleaning,
# "stopped in wind" exclusion and week-block holdout as the data set's direct path.
WIND_STORE_TASK: dict[str, Any] = {
    "task": "regression",
    "features": ["Ws_avg", "sin(Wa_avg)", "cos(Wa_avg)", "Ot_avg", "Va_avg"],
    "target": "P_avg",
    "time_signal": "row_time",
    "record_signal": "row_seq",
    "exclude_when": ["P_avg <= 0 and Ws_avg > 4"],
    "holdout_every": 5,
    "holdout_block_s": 604800,
    "holdout_origin_s": 1388534400,  # weeks counted from 2014-01-01, as the data set does
    "embargo_s": 86400,
}
WIND_VALID = {"Ot_avg": [-40, 50], "Ws_avg": [0, 40], "P_avg": [-100, 2255], "Va_avg": [-180, 180]}


def _model_names(options: DemoOptions, spec: ModelSpec) -> dict[str, Any]:
    """Feature and target names of the aggregator's [model]: store-fed gateways (field bus)
    need the fleet scaler of a statistics round; data set rows arrive scaled."""
    if options.field_bus == "modbus":
        return {"features": WIND_STORE_TASK["features"], "target": WIND_STORE_TASK["target"],
                "scaling": "federated"}
    return {"features": list(spec.features), "target": spec.target, "scaling": "none"}


def _field_bus_data(workdir: Path, options: DemoOptions, unit: str) -> tuple[dict[str, Any], str]:
    """The ``[data]`` table (and ``[data.valid]``) of a field-bus gateway; ``direct`` mode
    reads the same records ``[field_bus_start, field_bus_start + field_bus_rows)`` straight
    from the data set."""
    if options.field_bus != "modbus":
        rows = {"first_row": options.field_bus_start, "num_rows": options.field_bus_rows}
        return {"source": "dataset", "dataset": "wind", "unit": unit, **rows}, ""
    data: dict[str, Any] = {"source": "store", "store": str(store_path(workdir, unit)),
                            "device": unit, **WIND_STORE_TASK}
    return data, _table("data.valid", WIND_VALID)
