"""From a configured fusion rule to the ``FuseFn`` the round state machine calls.

The numeric rules live in ``aggregator.robust`` (plain numpy functions); this module only
binds a rule name and its parameters, and validates them at config load.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aggregator import robust
from aggregator.rounds import FuseFn
from fedcore.learning.params import Params

# the aggregator's own update on its trusted root data, from the weights the gateways hold
ServerUpdateFn = Callable[[Params], Params]


def check_rule(rule: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the problem if ``rule`` or its parameters are wrong."""
    robust.check_rule(rule, params)


def needs_root_data(rule: str) -> bool:
    return rule in robust.FUSION_RULES and robust.FUSION_RULES[rule].needs_server_update


def make_fuse(rule: str, params: dict[str, Any], server_update: ServerUpdateFn | None = None) -> FuseFn:
    check_rule(rule, params)
    needs = needs_root_data(rule)
    if needs and server_update is None:
        raise ValueError(f"fusion rule {rule!r} needs the aggregator's root data set (root_data)")

    def fuse(updates: list[Params], weights: list[float], held: Params) -> Params:
        reference = server_update(held) if server_update is not None and needs else None
        return robust.fuse(rule, updates, weights, params=params, server_update=reference).params

    return fuse
