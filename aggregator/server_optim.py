"""Server optimizers: how the fused client delta moves the global model.

FedAvg applies the fused delta with a server learning rate (1.0 = plain FedAvg); FedAvgM adds
server momentum (Hsu et al. 2019); FedAdam is Adam on the pseudo-gradient ``-delta`` (Reddi et
al. 2021, "Adaptive Federated Optimization"). Pure functions over Params with explicit,
JSON-able state so the checkpoint can carry it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedcore.learning.params import Params

SERVER_OPTIMIZERS = ("fedavg", "fedavgm", "fedadam")


@dataclass(frozen=True, slots=True)
class ServerOptimizerConfig:
    name: str = "fedavg"
    learning_rate: float = 1.0
    momentum: float = 0.9  # fedavgm
    beta1: float = 0.9  # fedadam
    beta2: float = 0.99
    tau: float = 1e-3  # fedadam adaptivity


@dataclass
class ServerOptimizerState:
    momentum: Params | None = None
    second_moment: Params | None = None
    steps: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for name, params in (("m", self.momentum), ("v", self.second_moment)):
            for i, p in enumerate(params or []):
                out[f"opt_{name}_{i}"] = p
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], steps: int) -> ServerOptimizerState:
        def collect(name: str) -> Params | None:
            items = sorted(
                (int(k.rsplit("_", 1)[1]), v) for k, v in arrays.items() if k.startswith(f"opt_{name}_")
            )
            return [np.asarray(v, np.float32) for _, v in items] or None

        return cls(momentum=collect("m"), second_moment=collect("v"), steps=steps)


def apply_server_update(
    config: ServerOptimizerConfig, state: ServerOptimizerState, weights: Params, delta: Params
) -> Params:
    """Return the new global weights; ``state`` is updated in place."""
    state.steps += 1
    lr = np.float32(config.learning_rate)
    if config.name == "fedavg":
        return [w + lr * d for w, d in zip(weights, delta, strict=True)]
    if config.name == "fedavgm":
        beta = np.float32(config.momentum)
        if state.momentum is None:
            state.momentum = [np.zeros_like(d) for d in delta]
        state.momentum = [beta * m + d for m, d in zip(state.momentum, delta, strict=True)]
        return [w + lr * m for w, m in zip(weights, state.momentum, strict=True)]
    if config.name == "fedadam":
        b1, b2, tau = np.float32(config.beta1), np.float32(config.beta2), np.float32(config.tau)
        if state.momentum is None or state.second_moment is None:
            state.momentum = [np.zeros_like(d) for d in delta]
            state.second_moment = [np.full_like(d, tau * tau) for d in delta]
        state.momentum = [b1 * m + (1 - b1) * d for m, d in zip(state.momentum, delta, strict=True)]
        state.second_moment = [
            b2 * v + (1 - b2) * d * d for v, d in zip(state.second_moment, delta, strict=True)
        ]
        return [
            w + lr * m / (np.sqrt(v) + tau)
            for w, m, v in zip(weights, state.momentum, state.second_moment, strict=True)
        ]
    raise ValueError(f"unknown server optimizer {config.name!r}; choose one of {SERVER_OPTIMIZERS}")
