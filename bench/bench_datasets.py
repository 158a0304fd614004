"""Baselines for the bundled data sets: centralized, federated (in-process FedAvg), local-only.

For each data set, with ``default_spec`` and ``default_train_config``:

- centralized: one model trained on the pooled training rows of every unit (the ceiling
  federation tries to reach), ``--epochs`` passes;
- FedAvg: ``--rounds`` rounds; every unit trains from the global model with the default
  config and the results are averaged weighted by sample count (no broker, no pipeline:
  the learning alone). Also the mean local-training time per gateway per round;
- local-only: each unit trains alone for the same number of rounds' worth of steps and is
  scored on its own test rows (sample-weighted over units, like the pooled test).

Metrics come from ``evaluate_dataset`` (regression errors on the original scale; wind on
normal rows, plus ROC AUC of the residual). Usage:
python bench/bench_datasets.py [--datasets wind batteries synthetic] [--rounds 20]
"""

from __future__ import annotations

import argparse
import time

import msgspec
import numpy as np

from fedcore.datasets import default_spec, default_train_config, evaluate_dataset, load_dataset
from fedcore.learning.models import init_params
from fedcore.learning.training import train_local


def _fmt(report: dict[str, float]) -> str:
    keys = [k for k in ("rmse", "mae", "roc_auc", "accuracy", "f1") if k in report]
    return " ".join(f"{k}={report[k]:.4g}" for k in keys)


def run(name: str, rounds: int, epochs: int) -> None:
    ds = load_dataset(name)
    spec = default_spec(ds)
    config = default_train_config(ds)
    print(f"\n## {name}: {len(ds.units)} units, spec {spec.layer_sizes}, {config}")
    x = np.concatenate([u.x_train for u in ds.units.values()])
    y = np.concatenate([u.y_train for u in ds.units.values()])
    start = init_params(spec, np.random.default_rng(0))

    central_config = msgspec.structs.replace(config, local_epochs=1, max_steps=0)
    params, rng = start, np.random.default_rng(0)
    t0 = time.perf_counter()
    for _ in range(epochs):
        params, _ = train_local(spec, params, x, y, central_config, rng)
    print(f"centralized {epochs} epochs ({time.perf_counter() - t0:.1f} s): "
          f"{_fmt(evaluate_dataset(ds, spec, params))}")

    global_params, rng = start, np.random.default_rng(1)
    busy = 0.0
    for r in range(1, rounds + 1):
        updates, weights = [], []
        for unit in ds.units.values():
            t0 = time.perf_counter()
            local, result = train_local(spec, global_params, unit.x_train, unit.y_train, config, rng)
            busy += time.perf_counter() - t0
            updates.append(local)
            weights.append(result.num_samples)
        w = np.array(weights, np.float64) / sum(weights)
        global_params = [
            sum(np.float32(wi) * u[i] for wi, u in zip(w, updates, strict=True))
            for i in range(len(start))
        ]
        if r in (1, rounds // 2, rounds) or r % 10 == 0:
            print(f"fedavg round {r}: {_fmt(evaluate_dataset(ds, spec, global_params))}")
    print(f"fedavg local training: {busy / (rounds * len(ds.units)) * 1000:.0f} ms per gateway per round")

    totals: dict[str, float] = {}
    n_test = 0
    rng = np.random.default_rng(2)
    for unit_name, unit in ds.units.items():
        if unit.num_test == 0:
            continue
        params = start
        for _ in range(rounds):
            params, _ = train_local(spec, params, unit.x_train, unit.y_train, config, rng)
        report = evaluate_dataset(ds, spec, params, unit=unit_name)
        for key in ("rmse", "accuracy"):
            if key in report:
                totals[key] = totals.get(key, 0.0) + (report[key] ** 2 if key == "rmse" else report[key]) * unit.num_test
        n_test += unit.num_test
    pooled = {k: (np.sqrt(v / n_test) if k == "rmse" else v / n_test) for k, v in totals.items()}
    print(f"local-only ({rounds} rounds of steps, own test rows): {_fmt(pooled)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["wind", "batteries", "synthetic"])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    for name in args.datasets:
        run(name, args.rounds, args.epochs)


if __name__ == "__main__":
    main()
