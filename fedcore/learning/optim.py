"""Local optimizers on :data:`~fedcore.learning.params.Params`, with explicit state.

Theory of operation
-------------------
An optimizer is a frozen description (``SGD(learning_rate, momentum)``, ``Adam(...)``) with
two pure methods: ``init(params) -> state`` and ``step(params, grads, state) ->
(new_params, new_state)``. The state (momentum buffers, Adam moments and step count) is a
frozen value the caller holds, so a training loop is a fold over mini-batches and two runs
with the same inputs give bit-identical results. Nothing is updated in place: the caller's
arrays (for instance the global model a delta is computed against) are never touched.

A gateway starts each round with a fresh state (``init``): the local optimizer state is not
part of the federated model, as in FedAvg with local SGD or Adam.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedcore.learning.params import Params

OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class SGDState:
    velocity: tuple[np.ndarray, ...]  # empty when momentum == 0
    steps: int = 0


@dataclass(frozen=True)
class AdamState:
    first_moment: tuple[np.ndarray, ...]
    second_moment: tuple[np.ndarray, ...]
    steps: int = 0


class Optimizer(Protocol):
    def init(self, params: Sequence[np.ndarray]) -> object: ...

    def step(
        self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: object
    ) -> tuple[Params, object]: ...


@dataclass(frozen=True)
class SGD:
    """Plain SGD, or heavy-ball momentum: ``v = m*v + g; w -= lr*v``."""

    learning_rate: float
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")

    def init(self, params: Sequence[np.ndarray]) -> SGDState:
        if self.momentum == 0:
            return SGDState(velocity=())
        return SGDState(velocity=tuple(np.zeros_like(p) for p in params))

    def step(
        self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: object
    ) -> tuple[Params, SGDState]:
        if not isinstance(state, SGDState):
            raise TypeError(f"SGD.step needs an SGDState, got {type(state).__name__}")
        lr = self.learning_rate
        if self.momentum == 0:
            new = [p - (lr * g).astype(p.dtype, copy=False) for p, g in zip(params, grads, strict=True)]
            return new, SGDState(velocity=(), steps=state.steps + 1)
        m = self.momentum
        velocity = tuple(
            (m * v + g).astype(v.dtype, copy=False)
            for v, g in zip(state.velocity, grads, strict=True)
        )
        new = [p - (lr * v).astype(p.dtype, copy=False) for p, v in zip(params, velocity, strict=True)]
        return new, SGDState(velocity=velocity, steps=state.steps + 1)


@dataclass(frozen=True)
class Adam:
    """Adam (Kingma & Ba) with bias correction."""

    learning_rate: float
    beta1: float = 0.9
    beta2: float = 0.999
    epsilon: float = 1e-8

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ValueError("beta1 and beta2 must be in [0, 1)")

    def init(self, params: Sequence[np.ndarray]) -> AdamState:
        zeros = tuple(np.zeros_like(p) for p in params)
        return AdamState(first_moment=zeros, second_moment=zeros)

    def step(
        self, params: Sequence[np.ndarray], grads: Sequence[np.ndarray], state: object
    ) -> tuple[Params, AdamState]:
        if not isinstance(state, AdamState):
            raise TypeError(f"Adam.step needs an AdamState, got {type(state).__name__}")
        t = state.steps + 1
        b1, b2 = self.beta1, self.beta2
        # Fold both bias corrections into one step size (the form in the Adam paper, sec. 2).
        step_size = float(self.learning_rate * np.sqrt(1 - b2**t) / (1 - b1**t))
        eps = float(self.epsilon * np.sqrt(1 - b2**t))
        m1: list[np.ndarray] = []
        m2: list[np.ndarray] = []
        new: Params = []
        for p, g, a, b in zip(params, grads, state.first_moment, state.second_moment, strict=True):
            a = (b1 * a + (1 - b1) * g).astype(p.dtype, copy=False)
            b = (b2 * b + (1 - b2) * (g * g)).astype(p.dtype, copy=False)
            new.append((p - step_size * a / (np.sqrt(b) + eps)).astype(p.dtype, copy=False))
            m1.append(a)
            m2.append(b)
        return new, AdamState(first_moment=tuple(m1), second_moment=tuple(m2), steps=t)


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.0) -> SGD | Adam:
    """The optimizer a :class:`~fedcore.protocol.messages.TrainConfig` names."""
    if name == "sgd":
        return SGD(learning_rate, momentum)
    if name == "adam":
        return Adam(learning_rate)
    raise ValueError(f"optimizer {name!r} is not one of {', '.join(OPTIMIZERS)}")
