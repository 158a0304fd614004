"""The federated statistics step: the fleet scaler from the gateways' sums, no raw rows.

A new lineage whose ``[model] scaling = "federated"`` starts with a statistics round: each
gateway answers with the count, sum and sum of squares of its raw training rows per column
(``DataStats``; the features, then the regression target). The fleet's mean and standard
deviation follow exactly (pooled moments): ``mean = S / N``, ``var = Q / N - mean^2``. The
scaler is fixed for the lineage (a model only works with the scaling it was trained on) and
travels to every gateway inside the model's spec. A constant column (std 0) is left
unscaled (std 1), as :class:`fedcore.datasets.base.Scaler` does.

What the aggregator learns is each gateway's per-column mean and variance; docs/privacy.md
says so. Pure functions; a bad message is a ``RemoteProtocolError`` with a reason.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterable

import msgspec

from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import DataStats, ModelSpec

MAX_COUNT = 10**9  # as an update's sample count (aggregator.rounds.MAX_SAMPLES)
EPSILON = sys.float_info.epsilon


def expected_columns(spec: ModelSpec) -> tuple[str, ...]:
    columns = tuple(spec.features)
    return (*columns, spec.target) if spec.task == "regression" else columns


def check_stats(spec: ModelSpec, lineage: str, stats: DataStats) -> None:
    """Validate one gateway's answer before it is kept."""
    if stats.lineage != lineage:
        raise RemoteProtocolError("wrong_lineage", f"statistics for {stats.lineage!r}")
    expected = expected_columns(spec)
    if tuple(stats.columns) != expected:
        raise RemoteProtocolError("bad_columns", f"columns {list(stats.columns)[:20]} != {list(expected)}")
    n = len(expected)
    if len(stats.sums) != n or len(stats.sums_sq) != n:
        raise RemoteProtocolError("bad_stats", f"need {n} sums and sums of squares")
    if not 0 < stats.count <= MAX_COUNT:
        raise RemoteProtocolError("bad_stats", f"count {stats.count}")
    values = (*stats.sums, *stats.sums_sq)
    if not all(math.isfinite(v) for v in values) or any(q < 0 for q in stats.sums_sq):
        raise RemoteProtocolError("bad_stats", "sums must be finite, sums of squares >= 0")
    # a sum of squares below sum^2 / count is impossible (negative variance)
    for s, q in zip(stats.sums, stats.sums_sq, strict=True):
        if q + 1e-9 * abs(q) < s * s / stats.count - 1e-6:
            raise RemoteProtocolError("bad_stats", "sums of squares smaller than the sums allow")


def fleet_scaler(spec: ModelSpec, answers: Iterable[DataStats]) -> ModelSpec:
    """``spec`` with the pooled mean and standard deviation of every column."""
    answers = list(answers)
    n = sum(a.count for a in answers)
    if n <= 0:
        raise ValueError("no rows in the statistics")
    width = len(expected_columns(spec))
    # q / n - mean^2 cancels: for a column of equal values it leaves rounding, not 0, of
    # up to about count * EPSILON * mean^2 (a gateway's running sums); below that the
    # column counts as constant
    resolution = max(1e-12, 8 * EPSILON * max(a.count for a in answers))
    means, stds = [], []
    for j in range(width):
        s = sum(a.sums[j] for a in answers)
        q = sum(a.sums_sq[j] for a in answers)
        mean = s / n
        var = max(0.0, q / n - mean * mean)
        std = math.sqrt(var)
        means.append(mean)
        stds.append(std if var > resolution * (q / n) and std > 1e-12 else 1.0)
    nf = len(spec.features)
    target_mean, target_std = (means[nf], stds[nf]) if spec.task == "regression" else (0.0, 1.0)
    return msgspec.structs.replace(
        spec, feature_mean=tuple(means[:nf]), feature_std=tuple(stds[:nf]),
        target_mean=target_mean, target_std=target_std,
    )
