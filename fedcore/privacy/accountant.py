"""The RDP accountant for Gaussian releases, in plain Python (no scipy on a gateway).

The aggregator's ledger (``aggregator/privacy.py``) uses ``dp_accounting``'s RdpAccountant,
which pulls scipy (~150 MB) and so must not reach a gateway (tests/test_layering.py). A
gateway's own ledger needs the same figures, so this module computes them the same way:
the RDP of each Gaussian release at dp_accounting's default orders, summed over releases,
converted to (epsilon, delta) with the same bound (Canonne et al., Prop. 12).

- Sampling rate 1 (update level): RDP(alpha) = alpha / (2 z^2), exact at every order, so
  epsilon equals the aggregator's (a test compares them).
- Poisson-sampled (record level, DP-SGD): the RDP is the exact binomial sum at *integer*
  orders only; the fractional orders dp_accounting also tries are left out. The minimum
  over fewer orders is never smaller, so a gateway's epsilon is at least the aggregator's:
  it may refuse a round slightly earlier, never later.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024])


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    high, low = max(a, b), min(a, b)
    return high + math.log1p(math.exp(low - high))


def _sampled_gaussian_rdp(q: float, z: float, order: int) -> float:
    """RDP at an integer order of one Poisson-sampled Gaussian release (binomial expansion)."""
    log_a = -math.inf
    for i in range(order + 1):
        term = (math.lgamma(order + 1) - math.lgamma(i + 1) - math.lgamma(order - i + 1)
                + i * math.log(q) + (order - i) * math.log1p(-q) + (i * i - i) / (2 * z * z))
        log_a = _logaddexp(log_a, term)
    return log_a / (order - 1)


def _rdp(z: float, q: float, steps: int, order: float) -> float:
    if q >= 1.0:
        return steps * order / (2 * z * z)
    if order != int(order):
        return math.inf  # not computed here: this order drops out of the minimum
    return steps * _sampled_gaussian_rdp(q, z, int(order))


def epsilon_of(events: Iterable[tuple[float, float, int]], delta: float) -> float:
    """Epsilon at ``delta`` of Gaussian releases given as (noise multiplier, sampling rate,
    steps); an un-noised release (z <= 0) has no finite epsilon."""
    if not 0.0 < delta < 1.0:
        raise ValueError("need 0 < delta < 1")
    events = [(float(z), float(q), int(n)) for z, q, n in events if q > 0 and n > 0]
    if not events:
        return 0.0
    if any(z <= 0 for z, _, _ in events):
        return math.inf
    best = math.inf
    for order in ORDERS:
        r = sum(_rdp(z, q, n, order) for z, q, n in events)
        if math.isinf(r):
            continue
        if delta ** 2 + math.expm1(-r) > 0:
            return 0.0
        if order > 1.01:
            best = min(best, r + math.log1p(-1 / order) - math.log(delta * order) / (order - 1))
    return best
