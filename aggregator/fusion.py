"""From a configured fusion rule to the ``FuseFn`` the round state machine calls.

The numeric rules live in ``aggregator.robust`` (plain numpy functions); this module only
binds a rule name and its parameters, and validates them at config load.
"""

from __future__ import annotations

from typing import Any

from fedcore.learning.params import Params

from aggregator import robust
from aggregator.rounds import FuseFn


def check_rule(rule: str, params: dict[str, Any]) -> None:
    """Raise ValueError naming the problem if ``rule`` or its parameters are wrong."""
    robust.check_rule(rule, params)


def make_fuse(rule: str, params: dict[str, Any]) -> FuseFn:
    check_rule(rule, params)

    def fuse(updates: list[Params], weights: list[float], _global: Params) -> Params:
        return robust.fuse(rule, updates, weights, params=params).params

    return fuse
