"""Robust fusion under attack: final model quality for each rule x attack x malicious share.

An in-memory federated simulation (no broker, no codec: this measures the fusion rules,
not the transport) on the real La Haute Borne wind data. The wind data has 4 turbines,
too few for 10/20/30 % malicious to mean anything, so each turbine's training rows are
dealt to ``--shards`` simulated gateways by week (the ``k``-th week with training rows
goes to gateway ``k mod shards``): each gateway sees its own turbine across the whole period, the fleet is
non-IID across turbines. With the default 4 x 5 = 20 gateways, 10/20/30 % are exactly
2/4/6 malicious gateways, the same ones (drawn from the seed) for every rule.

Each round every gateway trains from the global model (``train_local``), the malicious ones
then attack (``edge.attacks``): sign flip, scaling x10, Gaussian noise (std 1 per
coordinate), label flipping (the regression target negated before training) and
"a little is enough" (colluding: all malicious gateways send one update built from the
round's benign updates with Baruch et al.'s ``z_max``). The aggregator fuses the deltas
with the rule (``aggregator.robust.fuse``) and adds the result to the global model.
Rule settings are what an operator would configure for up to 30 % attackers:
``trimmed_mean`` trims 30 % per side, Krum/multi-Krum assume 6 Byzantine gateways,
``norm_bound`` clips to the median honest update norm of round 1 in a clean run, FLTrust's
root data set is 200 training rows drawn from the pooled fleet (the trusted data an
operator holds). Reputation (``aggregator.reputation``, default settings) watches every
run passively; its verdicts are reported but do not exclude anyone from the table's runs.

The score is R^2 in percent on every turbine's normal test rows (the "points" of the
accuracy claim) and RMSE in kW. Usage::

    python bench/bench_robust.py --out bench/RESULTS_robust.md
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import numpy as np

from aggregator import reputation, robust
from edge import attacks
from fedcore.datasets import default_spec, default_train_config, evaluate_dataset, load_dataset
from fedcore.datasets.base import FederatedDataset
from fedcore.learning.models import init_params
from fedcore.learning.params import Params, add, l2_norm, subtract
from fedcore.learning.training import train_local
from fedcore.protocol.messages import ModelSpec, TrainConfig

WEEK_S = 7 * 24 * 3600
ATTACKS = ("sign_flip", "scale", "gaussian_noise", "label_flip", "little_is_enough")
RULES = ("fedavg", "norm_bound", "median", "trimmed_mean", "krum", "multi_krum",
         "geometric_median", "fltrust")


@dataclass(frozen=True)
class Gateway:
    name: str
    x: np.ndarray
    y: np.ndarray


@dataclass(frozen=True)
class Setup:
    dataset: FederatedDataset
    spec: ModelSpec
    train: TrainConfig
    gateways: tuple[Gateway, ...]
    root_x: np.ndarray
    root_y: np.ndarray
    rounds: int
    seed: int
    y_var_kw: float  # variance of the normal test targets in kW^2, for R^2


@dataclass(frozen=True)
class Outcome:
    r2_pct: float
    rmse_kw: float
    caught: int  # malicious gateways quarantined by reputation
    false_alarms: int  # honest gateways quarantined
    seconds: float


def build_setup(shards: int, rows: int, rounds: int, steps: int, seed: int) -> Setup:
    ds = load_dataset("wind", gateways=4, max_rows_per_unit=rows, seed=seed)
    gateways = []
    for unit, data in ds.units.items():
        week = (np.asarray(data.t_train) // WEEK_S).astype(np.int64)
        # rank among the weeks that have training rows: the test split takes whole weeks
        # on a period of its own, so raw week numbers mod shards could leave a shard empty
        rank = np.unique(week, return_inverse=True)[1]
        for k in range(shards):
            mask = rank % shards == k
            gateways.append(Gateway(f"{unit}-{k}", data.x_train[mask], data.y_train[mask]))
    pooled_x = np.concatenate([g.x for g in gateways])
    pooled_y = np.concatenate([g.y for g in gateways])
    root = np.random.default_rng(seed + 1).choice(pooled_x.shape[0], 200, replace=False)
    base = default_train_config(ds)
    train = TrainConfig(local_epochs=1, batch_size=32, learning_rate=base.learning_rate,
                        optimizer=base.optimizer, max_steps=steps)
    labels = ds.test_labels
    y_test = ds.y_test if labels is None else ds.y_test[labels == 0]
    y_var = float(np.var(np.asarray(y_test, np.float64) * ds.scaler.target_std))
    return Setup(ds, default_spec(ds), train, tuple(gateways), pooled_x[root], pooled_y[root],
                 rounds, seed, y_var)


def honest_delta(setup: Setup, model: Params, x: np.ndarray, y: np.ndarray, key: list[int]) -> Params:
    trained, _ = train_local(setup.spec, model, x, y, setup.train, np.random.default_rng(key))
    return subtract(trained, model)


def calibrate_norm(setup: Setup) -> float:
    """Median honest update norm in round 1: the operator's norm bound."""
    model = init_params(setup.spec, np.random.default_rng(setup.seed))
    norms = [l2_norm(honest_delta(setup, model, g.x, g.y, [setup.seed, 0, i]))
             for i, g in enumerate(setup.gateways)]
    return float(np.median(norms))


def run(setup: Setup, rule: str, params: dict[str, float], attack: str, malicious: frozenset[int]) -> Outcome:
    start = time.perf_counter()
    spec, n = setup.spec, len(setup.gateways)
    model = init_params(spec, np.random.default_rng(setup.seed))
    counts = [float(g.x.shape[0]) for g in setup.gateways]
    attack_rng = np.random.default_rng([setup.seed, 99])
    z = attacks.alie_z(n, len(malicious)) if malicious else 0.0
    rep_state, rep_config = reputation.ReputationState(), reputation.ReputationConfig()
    quarantined: set[str] = set()
    for r in range(1, setup.rounds + 1):
        updates: list[Params] = []
        for i, g in enumerate(setup.gateways):
            y = g.y
            if i in malicious and attack == "label_flip":
                y = attacks.flip_labels(spec, y)
            updates.append(honest_delta(setup, model, g.x, y, [setup.seed, r, i]))
        benign = [u for i, u in enumerate(updates) if i not in malicious]
        for i in sorted(malicious):
            if attack == "sign_flip":
                updates[i] = attacks.sign_flip(updates[i])
            elif attack == "scale":
                updates[i] = attacks.scale(updates[i], 10.0)
            elif attack == "gaussian_noise":
                updates[i] = attacks.gaussian_noise(updates[i], attack_rng, 1.0)
            elif attack == "little_is_enough":
                updates[i] = attacks.little_is_enough(benign, z)
        server = None
        if rule == "fltrust":
            server = honest_delta(setup, model, setup.root_x, setup.root_y, [setup.seed, r, 10_000])
        result = robust.fuse(rule, updates, counts, params=params, server_update=server)
        model = add(model, result.params)
        if not all(np.isfinite(p).all() for p in model):
            return Outcome(float("nan"), float("nan"), 0, 0, time.perf_counter() - start)
        names = [g.name for g in setup.gateways]
        distances = dict(zip(names, result.per_client_info["distance"], strict=True))
        rep_state, events = reputation.observe(rep_state, rep_config, r, distances)
        quarantined |= {e.device for e in events if isinstance(e, reputation.Quarantined)}
    report = evaluate_dataset(setup.dataset, spec, model)
    bad = {setup.gateways[i].name for i in malicious}
    return Outcome(
        r2_pct=100.0 * (1.0 - report["mse"] / setup.y_var_kw),
        rmse_kw=report["rmse"],
        caught=len(quarantined & bad),
        false_alarms=len(quarantined - bad),
        seconds=time.perf_counter() - start,
    )


def rule_params(rule: str, max_norm: float) -> dict[str, float]:
    settings: dict[str, dict[str, float]] = {
        "trimmed_mean": {"trim_fraction": 0.3},
        "krum": {"num_byzantine": 6},
        "multi_krum": {"num_byzantine": 6},
        "norm_bound": {"max_norm": max_norm},
    }
    return settings.get(rule, {})


def cell(o: Outcome) -> str:
    return "diverged" if not np.isfinite(o.r2_pct) else f"{o.r2_pct:.1f} ({o.rmse_kw:.0f})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=5, help="gateways per turbine")
    ap.add_argument("--rows", type=int, default=4000, help="rows per turbine (train + test)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--steps", type=int, default=20, help="local steps per round")
    ap.add_argument("--fractions", default="0.1,0.2,0.3")
    ap.add_argument("--rules", default=",".join(RULES))
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="", help="write the markdown tables here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    setup = build_setup(args.shards, args.rows, args.rounds, args.steps, args.seed)
    max_norm = calibrate_norm(setup)
    n = len(setup.gateways)
    rules, attack_names = args.rules.split(","), args.attacks.split(",")
    fractions = [float(f) for f in args.fractions.split(",")]
    order = np.random.default_rng([args.seed, 7]).permutation(n)
    results: dict[tuple[str, str, float], Outcome] = {}
    for rule in rules:
        p = rule_params(rule, max_norm)
        results[(rule, "none", 0.0)] = run(setup, rule, p, "none", frozenset())
        for frac in fractions:
            bad = frozenset(int(i) for i in order[: round(frac * n)])
            for attack in attack_names:
                results[(rule, attack, frac)] = o = run(setup, rule, p, attack, bad)
                print(f"{rule:17s} {attack:17s} {frac:.0%}: {cell(o)} in {o.seconds:.1f} s",
                      file=sys.stderr, flush=True)
    lines = [
        f"dataset=wind (real) gateways={n} ({len(setup.dataset.units)} turbines x {args.shards}) "
        f"rows/turbine={args.rows} rounds={args.rounds} local steps={args.steps} "
        f"batch={setup.train.batch_size} {setup.train.optimizer} lr={setup.train.learning_rate} "
        f"seed={args.seed}; norm_bound max_norm={max_norm:.4f}; total {time.perf_counter() - t0:.0f} s",
        "",
    ]
    for frac in fractions:
        k = round(frac * n)
        lines += [f"### {frac:.0%} malicious ({k} of {n}): R^2 % (RMSE kW)", "",
                  "| rule | clean | " + " | ".join(attack_names) + " |",
                  "|---|---|" + "---|" * len(attack_names)]
        for rule in rules:
            row = [cell(results[(rule, "none", 0.0)])]
            row += [cell(results[(rule, a, frac)]) for a in attack_names]
            lines.append(f"| {rule} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["### Reputation verdicts (passive): malicious quarantined / honest quarantined", "",
              "| rule | fraction | clean | " + " | ".join(attack_names) + " |",
              "|---|---|---|" + "---|" * len(attack_names)]
    for rule in rules:
        for frac in fractions:
            clean = results[(rule, "none", 0.0)]
            row = [f"-/{clean.false_alarms}"]
            row += [f"{results[(rule, a, frac)].caught}/{results[(rule, a, frac)].false_alarms}"
                    for a in attack_names]
            lines.append(f"| {rule} | {frac:.0%} | " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
