"""The federated statistics step: the fleet scaler from the gateways' sums, no raw rows.

A new lineage whose ``[model] scaling = "federated"`` starts with a statistics round: each
gateway answers with the count, sum and centred sum of squares ``M2 = sum((x - mean_i)^2)``
of its raw training rows per column (``DataStats``; the features, then the regression
target). The fleet's mean and standard deviation follow exactly by the parallel merge of
Chan, Golub and LeVeque: ``mean = S / N``, ``N var = sum M2_i + sum n_i (mean_i - mean)^2``.
Centred sums keep the spread of a column far from zero (pressure in Pa: mean 101 325,
spread 3) where ``Q / N - mean^2`` would cancel it away in float64. The scaler is fixed for
the lineage (a model only works with the scaling it was trained on) and travels to every
gateway inside the model's spec. A constant column (std 0) is left unscaled (std 1), as
:class:`fedcore.datasets.base.Scaler` does.

What the aggregator learns is each gateway's per-column mean and variance; docs/privacy.md
says so. Pure functions; a bad message is a ``RemoteProtocolError`` with a reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from fedcore.errors import RemoteProtocolError
from fedcore.protocol.messages import DataStats, ModelSpec

MAX_COUNT = 10**9  # as an update's sample count (aggregator.rounds.MAX_SAMPLES)
RELATIVE_FLOOR = 1e-9


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
    if len(stats.sums) != n or len(stats.m2) != n:
        raise RemoteProtocolError("bad_stats", f"need {n} sums and centred sums of squares")
    if not 0 < stats.count <= MAX_COUNT:
        raise RemoteProtocolError("bad_stats", f"count {stats.count}")
    values = (*stats.sums, *stats.m2)
    if not all(math.isfinite(v) for v in values) or any(q < 0 for q in stats.m2):
        raise RemoteProtocolError("bad_stats", "sums must be finite, centred sums of squares >= 0")


def fleet_scaler(spec: ModelSpec, answers: Iterable[DataStats]) -> ModelSpec:
    """``spec`` with the pooled mean and standard deviation of every column."""
    answers = list(answers)
    n = sum(a.count for a in answers)
    if n <= 0:
        raise ValueError("no rows in the statistics")
    width = len(expected_columns(spec))
    means, stds = [], []
    for j in range(width):
        mean = sum(a.sums[j] for a in answers) / n
        m2 = sum(a.m2[j] + a.count * (a.sums[j] / a.count - mean) ** 2 for a in answers)
        var = m2 / n
        # the local centring of a constant column leaves rounding of about EPSILON * |mean|;
        # a spread below a billionth of the level (or 1e-12) is that rounding
        std = math.sqrt(var)
        stds.append(std if std > RELATIVE_FLOOR * max(1e-3, abs(mean)) else 1.0)
        means.append(mean)
    nf = len(spec.features)
    target_mean, target_std = (means[nf], stds[nf]) if spec.task == "regression" else (0.0, 1.0)
    return msgspec.structs.replace(
        spec, feature_mean=tuple(means[:nf]), feature_std=tuple(stds[:nf]),
        target_mean=target_mean, target_std=target_std,
    )
