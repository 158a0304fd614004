"""A saved lineage against the configured model: what changed, said so an operator can act.

A lineage's model (architecture, features, target, task) is fixed: a checkpoint saved with
one and a config naming another cannot be resumed. :func:`changed` names the first change
and its values; ``aggregator.main`` turns it into a configuration error that says how to
start a new lineage.
"""

from __future__ import annotations

import msgspec

from fedcore.protocol.messages import ModelSpec


class IncompatibleState(ValueError):
    """The saved state belongs to another model (architecture, features, target).
    ``key``: the first ``[model]`` key that changed, ``value``: its configured value."""

    def __init__(self, message: str, key: str = "", value: object = None) -> None:
        super().__init__(message)
        self.key = key
        self.value = value


def architecture(spec: ModelSpec) -> ModelSpec:
    """The parts of a spec a saved lineage must share with the config (not the scaler)."""
    return ModelSpec(spec.kind, tuple(spec.layer_sizes), spec.activation, spec.task,
                     tuple(spec.features), spec.target)


def changed(saved: ModelSpec, configured: ModelSpec, lineage: str) -> IncompatibleState:
    names = ("kind", "layer_sizes", "activation", "task", "features", "target")
    old = msgspec.json.decode(msgspec.json.encode(architecture(saved)))
    new = msgspec.json.decode(msgspec.json.encode(architecture(configured)))
    diffs = [(name, a, b) for name, a, b in zip(names, old, new, strict=False) if a != b]
    text = "; ".join(f"{name} {a!r} -> {b!r}" for name, a, b in diffs) or "the model differs"
    key, _, value = diffs[0] if diffs else ("", None, None)
    return IncompatibleState(f"lineage {lineage or '?'} was trained with another model: {text}",
                             key, value)
