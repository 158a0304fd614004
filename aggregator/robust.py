"""Robust fusion rules: plain numpy functions from client updates to one fused update.

Theory of operation
-------------------
Every rule takes the round's updates (each a :data:`Params`, the gateway's delta) and,
where the rule uses them, the sample counts as weights. Updates are flattened to one
float64 vector each (float64 so sums over many gateways do not lose precision) and the
result is unflattened back to float32 arrays in the updates' shapes.

- ``fedavg``: the sample-weighted mean. Optimal when every gateway is honest; one gateway
  can move it anywhere.
- ``median`` (coordinate-wise): the per-coordinate median, unweighted. Resists up to half
  the updates being arbitrary on each coordinate.
- ``trimmed_mean``: per coordinate, drop the ``floor(trim_fraction * n)`` lowest and
  highest values and average the rest (unweighted).
- ``krum`` / ``multi_krum`` (Blanchard et al. 2017): score each update by the summed
  squared distance to its ``n - f - 2`` nearest neighbours; Krum returns the best-scored
  update, multi-Krum the sample-weighted mean of the ``m`` best.
- ``geometric_median`` (RFA, Pillutla et al. 2022): the weighted point minimising the sum of
  Euclidean distances, found with the smoothed Weiszfeld iteration.
- ``fltrust`` (Cao et al. 2021): the aggregator trains on a small trusted root data set and
  its own update sets the direction: each client's trust is ``ReLU(cosine)`` to it, each
  client's update is rescaled to the server update's norm, the result is the trust-weighted
  mean.
- ``norm_bound``: clip every update to an L2 bound, then FedAvg. Any rule accepts a
  ``max_norm`` parameter that applies the same clipping before it fuses.

Rules whose guarantee needs enough updates (Krum needs ``n > 2f + 2``) still answer when a
round closes with fewer: they fall back to the strongest choice that is defined (fewer
neighbours, fewer trimmed values) rather than fail a round. :func:`fuse` is the one entry
point the round logic uses; it checks the rule and its parameters (``ValueError`` naming
both, which the config loader turns into a ``ConfigError``) and reports per-client details
(weights, scores, selections and each update's distance from the result) for reputation.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.learning.params import Params, Shapes, flatten, shapes_of, unflatten

PerClient = dict[str, tuple[float, ...]]


@dataclass(frozen=True)
class FusionResult:
    params: Params
    # per-client details, one value per update in input order: "weight", "distance", and
    # rule-specific ones ("score", "selected", "trust", "clip_scale")
    per_client_info: Mapping[str, tuple[float, ...]]


# ---- helpers ------------------------------------------------------------------------------


def _stack(updates: Sequence[Params]) -> tuple[np.ndarray, Shapes]:
    if not updates:
        raise ValueError("no updates to fuse")
    shapes = shapes_of(updates[0])
    for i, u in enumerate(updates[1:], start=1):
        if shapes_of(u) != shapes:
            raise ValueError(f"update {i} has shapes {shapes_of(u)}, update 0 has {shapes}")
    matrix = np.stack([flatten(u).astype(np.float64) for u in updates])
    if not np.isfinite(matrix).all():
        raise ValueError("an update is not finite (validate updates before fusing)")
    return matrix, shapes


def _weights(weights: Sequence[float] | None, n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (n,):
        raise ValueError(f"{w.size} weights for {n} updates")
    if not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, >= 0 and not all 0, got {w.tolist()}")
    return np.asarray(w / w.sum(), dtype=np.float64)


def _out(vector: np.ndarray, shapes: Shapes) -> Params:
    return unflatten(vector.astype(np.float32), shapes)


def _distances(matrix: np.ndarray, point: np.ndarray) -> np.ndarray:
    return np.asarray(np.linalg.norm(matrix - point, axis=1), dtype=np.float64)


def outlier_distances(updates: Sequence[Params], fused: Params) -> list[float]:
    """L2 distance of each update from the fused update (the input to reputation)."""
    matrix, _ = _stack(updates)
    return [float(d) for d in _distances(matrix, flatten(fused).astype(np.float64))]


# ---- the rules ----------------------------------------------------------------------------


def cap_shares(weights: Sequence[float], max_share: float) -> list[float]:
    """Weights where none is more than ``max_share`` of their sum (water-filling: the
    largest are lowered to one cap ``c = max_share * sum(min(w, c))``; the rest keep
    theirs). A gateway's claimed sample count weighs its update in FedAvg; a lying or
    misconfigured one cannot take more than this share of the round. ``max_share`` 0 or 1:
    unchanged; too few weights for the cap (``n * max_share <= 1``): all equal."""
    w = [float(x) for x in weights]
    n = len(w)
    if not 0 < max_share < 1 or n == 0 or max(w) <= max_share * sum(w):
        return w
    if n * max_share <= 1:
        return [min(w)] * n
    order = sorted(w, reverse=True)
    for k in range(1, n):  # cap the k largest: c = share * (k * c + the others' sum)
        cap = max_share * sum(order[k:]) / (1 - max_share * k)
        if order[k] <= cap <= order[k - 1]:
            return [min(x, cap) for x in w]
    return [min(w)] * n  # not reached: some k always fits when n * max_share > 1


def fedavg(updates: Sequence[Params], weights: Sequence[float]) -> Params:
    matrix, shapes = _stack(updates)
    return _out(_weights(weights, len(updates)) @ matrix, shapes)


def coordinate_median(updates: Sequence[Params]) -> Params:
    matrix, shapes = _stack(updates)
    return _out(np.median(matrix, axis=0), shapes)


def _trim_count(n: int, trim_fraction: float) -> int:
    # keep at least one value per coordinate: with too few updates this becomes the median
    return min(int(np.floor(trim_fraction * n)), (n - 1) // 2)


def trimmed_mean(updates: Sequence[Params], trim_fraction: float) -> Params:
    if not 0.0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    matrix, shapes = _stack(updates)
    k = _trim_count(len(updates), trim_fraction)
    ordered = np.sort(matrix, axis=0)
    return _out(ordered[k : len(updates) - k].mean(axis=0), shapes)


def _pairwise_sq(matrix: np.ndarray) -> np.ndarray:
    sq = np.einsum("ij,ij->i", matrix, matrix)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (matrix @ matrix.T)
    np.fill_diagonal(d2, 0.0)
    return np.asarray(np.maximum(d2, 0.0))  # rounding can make a tiny distance negative


def krum_scores(updates: Sequence[Params], num_byzantine: int) -> np.ndarray:
    """Each update's summed squared distance to its ``n - f - 2`` nearest others."""
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    matrix, _ = _stack(updates)
    n = len(updates)
    if n == 1:
        return np.zeros(1)
    neighbours = max(1, min(n - 1, n - num_byzantine - 2))
    d2 = _pairwise_sq(matrix)
    d2[np.diag_indices(n)] = np.inf  # an update is not its own neighbour
    nearest = np.sort(d2, axis=1)[:, :neighbours]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def krum(updates: Sequence[Params], num_byzantine: int) -> Params:
    scores = krum_scores(updates, num_byzantine)
    best = int(np.argmin(scores))  # ties go to the lowest index: deterministic
    return [np.array(p, dtype=np.float32) for p in updates[best]]


def _multi_krum_selection(scores: np.ndarray, num_byzantine: int, m: int) -> np.ndarray:
    n = scores.size
    count = m if m > 0 else n - num_byzantine
    count = max(1, min(n, count))
    return np.argsort(scores, kind="stable")[:count]


def multi_krum(
    updates: Sequence[Params],
    num_byzantine: int,
    m: int,
    weights: Sequence[float] | None = None,
) -> Params:
    """Mean of the ``m`` best Krum-scored updates (``m=0``: ``n - num_byzantine``)."""
    if m < 0:
        raise ValueError(f"m must be >= 0, got {m}")
    scores = krum_scores(updates, num_byzantine)
    chosen = _multi_krum_selection(scores, num_byzantine, m)
    w = _weights(weights, len(updates))[chosen]
    matrix, shapes = _stack([updates[i] for i in chosen])
    return _out((w / w.sum()) @ matrix, shapes)


def _weiszfeld(
    matrix: np.ndarray, alpha: np.ndarray, iters: int, eps: float, tol: float
) -> tuple[np.ndarray, np.ndarray]:
    """Smoothed Weiszfeld; returns the point and the final per-client fusion weights."""
    point = alpha @ matrix
    beta = alpha
    objective = float(alpha @ _distances(matrix, point))
    for _ in range(iters):
        # eps keeps a point that lands on an update from dividing by zero (the smoothing)
        beta = alpha / np.maximum(eps, _distances(matrix, point))
        beta = beta / beta.sum()
        point = beta @ matrix
        new_objective = float(alpha @ _distances(matrix, point))
        if abs(objective - new_objective) <= tol * max(new_objective, 1e-30):
            break
        objective = new_objective
    return point, beta


def geometric_median(
    updates: Sequence[Params],
    weights: Sequence[float] | None,
    iters: int = 100,
    eps: float = 1e-6,
    tol: float = 1e-7,
) -> Params:
    if iters < 1 or not eps > 0 or tol < 0:
        raise ValueError(f"need iters >= 1, eps > 0, tol >= 0; got {iters}, {eps}, {tol}")
    matrix, shapes = _stack(updates)
    point, _ = _weiszfeld(matrix, _weights(weights, len(updates)), iters, eps, tol)
    return _out(point, shapes)


def norm_bound(updates: Sequence[Params], max_norm: float) -> list[Params]:
    """Each update scaled down to L2 norm ``max_norm`` if it is longer (else unchanged)."""
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    out: list[Params] = []
    for u in updates:
        norm = float(np.linalg.norm(flatten(u).astype(np.float64)))
        factor = min(1.0, max_norm / norm) if norm > 0 else 1.0
        out.append([np.asarray(p, np.float32) * np.float32(factor) for p in u])
    return out


def fltrust_trust(updates: Sequence[Params], server_update: Params) -> np.ndarray:
    """ReLU(cosine similarity) of each update to the server's own update."""
    matrix, _ = _stack([server_update, *updates])
    server, clients = matrix[0], matrix[1:]
    norms = np.linalg.norm(clients, axis=1)
    server_norm = float(np.linalg.norm(server))
    if server_norm == 0:
        return np.zeros(len(updates))
    with np.errstate(divide="ignore", invalid="ignore"):
        cosine = np.where(norms > 0, clients @ server / (norms * server_norm), 0.0)
    return np.asarray(np.maximum(cosine, 0.0), dtype=np.float64)


def fltrust(updates: Sequence[Params], server_update: Params) -> Params:
    matrix, shapes = _stack(updates)
    trust = fltrust_trust(updates, server_update)
    if trust.sum() <= 0:
        # nobody points the server's way: no step is safer than trusting anyone
        return _out(np.zeros(matrix.shape[1]), shapes)
    server_norm = float(np.linalg.norm(flatten(server_update).astype(np.float64)))
    norms = np.linalg.norm(matrix, axis=1)
    rescale = np.where(norms > 0, server_norm / np.where(norms > 0, norms, 1.0), 0.0)
    return _out(((trust * rescale) / trust.sum()) @ matrix, shapes)


# ---- the registry -------------------------------------------------------------------------


@dataclass(frozen=True)
class RuleParam:
    default: float
    integer: bool
    check: Callable[[float], bool]
    requirement: str  # said in the error when ``check`` fails


RunFn = Callable[[list[Params], list[float], dict[str, Any], Params | None], tuple[Params, PerClient]]


@dataclass(frozen=True)
class FusionRule:
    name: str
    run: RunFn
    params: Mapping[str, RuleParam]
    needs_server_update: bool = False


_MAX_NORM = RuleParam(0.0, False, lambda v: v >= 0, ">= 0 (0 = no clipping)")
_BYZANTINE = RuleParam(1, True, lambda v: v >= 0, "an integer >= 0")


def _run_fedavg(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    return fedavg(u, w), {"weight": tuple(_weights(w, len(u)).tolist())}


def _run_median(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    return coordinate_median(u), {}


def _run_trimmed(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    k = _trim_count(len(u), p["trim_fraction"])
    return trimmed_mean(u, p["trim_fraction"]), {"trimmed_per_side": (float(k),) * len(u)}


def _run_krum(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    scores = krum_scores(u, p["num_byzantine"])
    best = int(np.argmin(scores))
    selected = tuple(1.0 if i == best else 0.0 for i in range(len(u)))
    fused = [np.array(a, dtype=np.float32) for a in u[best]]
    return fused, {"score": tuple(scores.tolist()), "selected": selected}


def _run_multi_krum(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    scores = krum_scores(u, p["num_byzantine"])
    chosen = set(_multi_krum_selection(scores, p["num_byzantine"], p["m"]).tolist())
    selected = tuple(1.0 if i in chosen else 0.0 for i in range(len(u)))
    fused = multi_krum(u, p["num_byzantine"], p["m"], w)
    return fused, {"score": tuple(scores.tolist()), "selected": selected}


def _run_geomed(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    matrix, shapes = _stack(u)
    point, beta = _weiszfeld(matrix, _weights(w, len(u)), p["iters"], p["eps"], p["tol"])
    return _out(point, shapes), {"weight": tuple(beta.tolist())}


def _run_fltrust(u: list[Params], w: list[float], p: dict[str, Any], s: Params | None) -> tuple[Params, PerClient]:
    assert s is not None  # fuse() has checked
    return fltrust(u, s), {"trust": tuple(fltrust_trust(u, s).tolist())}


FUSION_RULES: Mapping[str, FusionRule] = {
    r.name: r
    for r in (
        FusionRule("fedavg", _run_fedavg, {"max_norm": _MAX_NORM}),
        FusionRule("norm_bound", _run_fedavg,
                   {"max_norm": RuleParam(1.0, False, lambda v: v > 0, "> 0")}),
        FusionRule("median", _run_median, {"max_norm": _MAX_NORM}),
        FusionRule("coordinate_median", _run_median, {"max_norm": _MAX_NORM}),
        FusionRule("trimmed_mean", _run_trimmed, {
            "trim_fraction": RuleParam(0.1, False, lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
            "max_norm": _MAX_NORM}),
        FusionRule("krum", _run_krum, {"num_byzantine": _BYZANTINE, "max_norm": _MAX_NORM}),
        FusionRule("multi_krum", _run_multi_krum, {
            "num_byzantine": _BYZANTINE,
            "m": RuleParam(0, True, lambda v: v >= 0, "an integer >= 0 (0 = n - num_byzantine)"),
            "max_norm": _MAX_NORM}),
        FusionRule("geometric_median", _run_geomed, {
            "iters": RuleParam(100, True, lambda v: v >= 1, "an integer >= 1"),
            "eps": RuleParam(1e-6, False, lambda v: v > 0, "> 0"),
            "tol": RuleParam(1e-7, False, lambda v: v >= 0, ">= 0"),
            "max_norm": _MAX_NORM}),
        FusionRule("fltrust", _run_fltrust, {"max_norm": _MAX_NORM}, needs_server_update=True),
    )
}


def resolve_params(rule: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The rule's parameters with defaults filled in; ``ValueError`` naming rule and key."""
    spec = FUSION_RULES.get(rule)
    if spec is None:
        raise ValueError(f"unknown fusion rule {rule!r}; known: {', '.join(sorted(FUSION_RULES))}")
    unknown = sorted(set(params) - set(spec.params))
    if unknown:
        allowed = ", ".join(sorted(spec.params)) or "none"
        raise ValueError(f"fusion rule {rule!r}: unknown parameter {unknown[0]!r} (allowed: {allowed})")
    out: dict[str, Any] = {}
    for key, p in spec.params.items():
        value = params.get(key, p.default)
        # bool is an int in Python; a TOML `true` is never a number here
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"fusion rule {rule!r}: parameter {key!r} = {value!r} is not a number")
        if p.integer and (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"fusion rule {rule!r}: parameter {key!r} = {value!r} must be {p.requirement}")
        value = int(value) if p.integer else float(value)
        if not np.isfinite(value) or not p.check(value):
            raise ValueError(f"fusion rule {rule!r}: parameter {key!r} = {value!r} must be {p.requirement}")
        out[key] = value
    return out


def check_rule(rule: str, params: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the rule and the parameter if either is wrong."""
    resolve_params(rule, params)


def fuse(
    rule: str,
    updates: Sequence[Params],
    weights: Sequence[float],
    *,
    params: Mapping[str, Any] | None = None,
    server_update: Params | None = None,
) -> FusionResult:
    """Fuse the round's updates with ``rule`` (after ``max_norm`` clipping if set)."""
    p = resolve_params(rule, params or {})
    spec = FUSION_RULES[rule]
    if spec.needs_server_update and server_update is None:
        raise ValueError(f"fusion rule {rule!r} needs the server's update on its root data set")
    matrix, _ = _stack(updates)
    _weights(weights, len(updates))  # refuse bad weights before any work
    info: PerClient = {}
    todo = list(updates)
    if p.get("max_norm", 0.0) > 0:
        norms = np.linalg.norm(matrix, axis=1)
        scales = np.where(norms > p["max_norm"], p["max_norm"] / np.where(norms > 0, norms, 1), 1.0)
        info["clip_scale"] = tuple(scales.tolist())
        todo = norm_bound(todo, p["max_norm"])
    fused, extra = spec.run(todo, list(weights), p, server_update)
    info.update(extra)
    # distances from the inputs as received, so clipping does not hide an oversized update
    info["distance"] = tuple(_distances(matrix, flatten(fused).astype(np.float64)).tolist())
    return FusionResult(params=fused, per_client_info=info)
