"""Config pieces shared by every service: the broker connection and the task identity."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fedcore.config import Section
from fedcore.errors import LocalProtocolError
from fedcore.protocol.messages import ModelSpec, PipelineConfig, TrainConfig
from fedcore.protocol.topics import check_name


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    url: str
    client_id: str
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    max_payload: int = 8 * 1024 * 1024
    # the largest message taken in: one that is larger than max_payload arrives in chunks
    max_message: int = 8 * 1024 * 1024
    file: str = ""  # the config file it came from, named in errors about its TLS files
    # a service that has not reached the broker this long after starting exits 69 (0: never)
    startup_timeout_s: float = 120.0


def broker_config(sec: Section, default_client_id: str) -> BrokerConfig:
    url = sec.str("url", "mqtt://127.0.0.1:1883")
    if not (url.startswith("mqtt://") or url.startswith("mqtts://")):
        raise sec.error("url", url, "must start with mqtt:// or mqtts://")
    tls = [sec.path(k) if sec.has(k) else None for k in ("ca_file", "cert_file", "key_file")]
    if url.startswith("mqtts://") and tls[0] is None:
        raise sec.error("ca_file", None, "required for mqtts:// (the fleet CA certificate)")
    cfg = BrokerConfig(
        url=url,
        client_id=sec.str("client_id", default_client_id),
        ca_file=tls[0],
        cert_file=tls[1],
        key_file=tls[2],
        max_payload=sec.int("max_payload", 8 * 1024 * 1024, min=1024),
        max_message=sec.int("max_message", 8 * 1024 * 1024, min=1024, max=1024 * 1024 * 1024),
        file=sec.file,
        startup_timeout_s=sec.float("startup_timeout_s", 120.0, min=0.0),
    )
    sec.reject_unknown()
    return cfg


def name(sec: Section, key: str, default: str | None = None, what: str | None = None) -> str:
    """A topic-level name at ``key``; ``what`` is its kind when the key says otherwise
    (``[task] name`` is a task)."""
    value = sec.str(key) if default is None else sec.str(key, default)
    try:
        return check_name(value, what or key)
    except LocalProtocolError as exc:
        reason = str(exc).split(" ", 2)[2] if "branch of the topic tree" in str(exc) else \
            "use only letters, digits, '_', '.', '-' (max 64)"
        raise sec.error(key, value, reason) from None


def train_config(sec: Section) -> TrainConfig:
    cfg = TrainConfig(
        local_epochs=sec.int("local_epochs", 1, min=1, max=1000),
        batch_size=sec.int("batch_size", 32, min=1),
        learning_rate=sec.float("learning_rate", 0.01, min=0.0),
        optimizer=sec.str("optimizer", "sgd", choices=("sgd", "adam")),
        max_steps=sec.int("max_steps", 0, min=0),
        qat=sec.bool("qat", False),
    )
    sec.reject_unknown()
    return cfg


def pipeline_config(sec: Section) -> PipelineConfig:
    compression = sec.str_list("compression", [])
    known = ("topk:", "int8", "int8:", "zstd", "zlib")
    for stage in compression:
        if not any(stage == k or (k.endswith(":") and stage.startswith(k)) for k in known):
            raise sec.error("compression", list(compression), f"unknown stage {stage!r}; use topk:FRACTION, int8 or int8:CHUNK, zstd or zlib")
    cfg = PipelineConfig(
        clip_norm=sec.float("clip_norm", 0.0, min=0.0),
        noise_multiplier=sec.float("noise_multiplier", 0.0, min=0.0),
        compression=compression,
        adaptive_clip_quantile=sec.float("adaptive_clip_quantile", 0.0, min=0.0, max=1.0),
    )
    if cfg.noise_multiplier > 0 and cfg.clip_norm <= 0:
        raise sec.error("noise_multiplier", cfg.noise_multiplier, "needs clip_norm > 0 (noise is scaled to the clip norm)")
    return cfg


def model_spec(sec: Section) -> ModelSpec:
    sizes = sec._get("layer_sizes", None)
    if not isinstance(sizes, list) or len(sizes) < 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise sec.error("layer_sizes", sizes, "must be a list of at least two positive integers")
    spec = ModelSpec(
        kind=sec.str("kind", "mlp", choices=("mlp", "autoencoder")),
        layer_sizes=tuple(sizes),
        activation=sec.str("activation", "relu", choices=("relu", "tanh")),
        task=sec.str("task", "regression", choices=("regression", "classification", "anomaly")),
        features=sec.str_list("features", []),
        target=sec.str("target", ""),
    )
    sec.reject_unknown()
    return spec
