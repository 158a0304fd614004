"""Record-level DP (DP-SGD) with hyper-parameters chosen on a validation split, not on the test set.

Theory of operation
-------------------
``bench/bench_dpsgd.py`` ran DP-SGD with the non-private hyper-parameters. DP-SGD usually
wants others (clip norm, batch size, learning rate), but choosing them by test RMSE would
make the test figure optimistic. This bench keeps the test rows out of every choice:

1. **Validation split.** From each gateway's *training* rows only, every 5th training week
   (weeks counted from 2014-01-01 as in ``fedcore.datasets.wind``, test weeks skipped, so
   training weeks 4, 9, 14, ... in order) is held out for validation, and training rows
   within one day of a validation week are dropped (the same embargo the train/test split
   uses: 10-minute rows a few minutes apart are near copies). The rest ("fit rows") trains.
   The scaler is the data set's own (fitted on all training rows, never on test rows).
2. **Selection.** Each configuration runs ``--rounds`` rounds of the in-memory federation
   (``bench/harness.py``) on the fit rows; its score is the validation RMSE (kW, pooled over
   the gateways' validation rows) of the global model after the last round. Stage A is the
   grid clip x batch x learning rate with Adam; stage B varies the winner of A: plain SGD
   (``TrainConfig`` has no momentum field, so SGD with momentum is not expressible) at three
   learning rates, and 2 or 4 local epochs. The non-private baseline gets the same search
   without the clip axis. Each target epsilon is searched on its own.
3. **Test.** The selected configuration is run once on the full training rows (fit +
   validation, so every row a gateway holds trains, as it would in service) and scored on
   the test rows with ``evaluate_dataset``, beside the selected non-private configuration.

Epsilon accounting is exact for each run: sigma comes from ``record_noise_multiplier_for``
with ``min_records`` = the smallest gateway's row count of the rows that run trains on (q =
batch / n and the step count change with batch size and epochs), and the aggregator's ledger
(level "record") charges each gateway its own q and steps. The privacy cost of the search
itself (many runs on the same records) is *not* accounted, the usual caveat of DP
hyper-parameter tuning.

Run: python bench/bench_dpsgd_tune.py [--max-rows 10000] [--epsilons 2 8] [--out bench/RESULTS_dpsgd.md]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import sys
import time
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import Bench  # noqa: E402
from harness import run_federation  # noqa: E402

from aggregator.privacy import PrivacyLedger, record_noise_multiplier_for  # noqa: E402
from aggregator.rounds import RoundConfig  # noqa: E402
from fedcore.datasets import (  # noqa: E402
    FederatedDataset,
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.datasets.base import UnitData  # noqa: E402
from fedcore.datasets.wind import EMBARGO, EPOCH, WEEK  # noqa: E402
from fedcore.protocol.messages import PipelineConfig, TrainConfig  # noqa: E402

DELTA = 1e-5
CLIPS = (0.3, 1.0, 3.0)
BATCHES = (64, 256, 1024)
ADAM_LRS = (0.003, 0.01, 0.03)
SGD_LRS = (0.03, 0.1, 0.3)
EPOCHS = (2, 4)
BEGIN, END = "<!-- tune: begin (bench/bench_dpsgd_tune.py) -->", "<!-- tune: end -->"


def _validation_week(week: np.ndarray) -> np.ndarray:
    """Whether week index ``week`` (from EPOCH) is a validation week: every 5th training week."""
    training = week % 5 != 4  # the data set's own test weeks are every 5th calendar week
    ordinal = (week // 5) * 4 + week % 5  # position among training weeks
    return training & (ordinal % 5 == 4)


def validation_split(dataset: FederatedDataset) -> tuple[FederatedDataset, dict[str, tuple[int, int]]]:
    """The data set with each unit's training rows split into fit rows (``x_train``) and
    validation rows (``x_test``, no anomaly labels: training rows are all normal)."""
    units: dict[str, UnitData] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name, u in dataset.units.items():
        rel = u.t_train - EPOCH
        week = np.floor(rel / WEEK).astype(np.int64)
        offset = rel - week * WEEK
        val = _validation_week(week)
        near = ((offset < EMBARGO) & _validation_week(week - 1)) | (
            (offset >= WEEK - EMBARGO) & _validation_week(week + 1))
        fit = ~val & ~near
        units[name] = UnitData(u.x_train[fit], u.y_train[fit], u.x_train[val], u.y_train[val],
                               u.t_train[fit], u.t_train[val], None)
        sizes[name] = (int(fit.sum()), int(val.sum()))
    return dataclasses.replace(dataset, units=units), sizes


@dataclasses.dataclass
class Trial:
    stage: str
    train: TrainConfig  # dp_noise is the calibrated sigma (0 when non-private)
    epsilon: float  # target; 0 = non-private
    rmse: float = float("nan")
    spent: float = 0.0
    seconds: float = 0.0


def run(dataset: FederatedDataset, bench: Bench, train: TrainConfig, epsilon: float,
        seed: int) -> tuple[TrainConfig, float, float, float]:
    """(train with sigma, final RMSE on ``dataset``'s held-out rows, epsilon spent, seconds)."""
    ledger = None
    if epsilon > 0:
        min_records = min(u.num_train for u in dataset.units.values())
        z = record_noise_multiplier_for(epsilon, DELTA, train, bench.rounds, min_records)
        train = msgspec.structs.replace(train, dp_noise=z)
        ledger = PrivacyLedger(epsilon, DELTA, "stop", level="record")
    config = RoundConfig(rounds=bench.rounds, min_participants=len(dataset.units), train=train,
                         pipeline=PipelineConfig())
    t0 = time.perf_counter()
    result = run_federation(dataset, bench.spec, config, bench.start, seed=seed, ledger=ledger,
                            evaluate=lambda p: _evaluate(dataset, bench, p))
    last = result.records[-1]
    return train, last.metrics["rmse"], max(last.epsilon.values(), default=0.0), time.perf_counter() - t0


def _evaluate(dataset: FederatedDataset, bench: Bench, params: list[np.ndarray]) -> dict[str, float]:
    return evaluate_dataset(dataset, bench.spec, params)


def describe(t: TrainConfig) -> str:
    clip = f"clip {t.dp_clip:g}, " if t.dp_clip else ""
    return (f"{clip}batch {t.batch_size}, {t.optimizer} lr {t.learning_rate:g}, "
            f"{t.local_epochs} epoch{'s' if t.local_epochs > 1 else ''}")


def search(fit: FederatedDataset, bench: Bench, base: TrainConfig, epsilon: float,
           seed: int) -> list[Trial]:
    """Stage A grid, then stage B around A's winner; every trial scored on validation RMSE."""
    clips = CLIPS if epsilon > 0 else (0.0,)
    stage_a = [msgspec.structs.replace(base, dp_clip=c, batch_size=b, learning_rate=lr)
               for c, b, lr in itertools.product(clips, BATCHES, ADAM_LRS)]
    trials: list[Trial] = []

    def trial(stage: str, train: TrainConfig) -> None:
        t = Trial(stage, train, epsilon)
        t.train, t.rmse, t.spent, t.seconds = run(fit, bench, train, epsilon, seed)
        trials.append(t)
        print(f"eps={epsilon:g} {stage} {describe(t.train):<46} sigma={t.train.dp_noise:.3g} "
              f"val_rmse={t.rmse:7.2f} spent={t.spent:.3g} ({t.seconds:.0f} s)", flush=True)

    for train in stage_a:
        trial("A", train)
    best = min(trials, key=lambda t: t.rmse).train
    best = msgspec.structs.replace(best, dp_noise=0.0)
    for lr in SGD_LRS:
        trial("B", msgspec.structs.replace(best, optimizer="sgd", learning_rate=lr))
    for epochs in EPOCHS:
        trial("B", msgspec.structs.replace(best, local_epochs=epochs))
    return trials


def render(args: argparse.Namespace, sizes: dict[str, tuple[int, int]], full_sizes: dict[str, int],
           searches: dict[float, list[Trial]], finals: dict[float, list[Trial]], wall: float) -> str:
    out = [
        BEGIN,
        "## Tuned on a validation split",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {datetime.date.today().isoformat()}; whole run {wall / 60:.1f} min on a shared "
        "2-core machine (sequential runs).",
        "",
        "Validation split (bench/bench_dpsgd_tune.py): from each gateway's *training* rows, every "
        "5th training week (weeks from 2014-01-01, the data set's test weeks skipped) is held out; "
        "training rows within one day of a validation week are dropped (embargo). (fit, validation) "
        f"rows per gateway: {sizes}; full training rows {full_sizes}. Selection: validation RMSE "
        f"(kW) after round {args.rounds}, seed {args.seed}. Stage A: clip {list(CLIPS)} x batch "
        f"{list(BATCHES)} x Adam lr {list(ADAM_LRS)} (non-private: no clip axis); stage B from A's "
        f"winner: SGD (no momentum) lr {list(SGD_LRS)}, local epochs {list(EPOCHS)}. Rounds fixed "
        f"at {args.rounds}, max_steps 500, FedAvg, all gateways every round. Sigma per run from "
        f"`record_noise_multiplier_for(eps, {DELTA:g}, train, {args.rounds}, min_records)` on the "
        "rows that run trains on; `spent` is the ledger's largest per-gateway epsilon. The privacy "
        "cost of the search itself is not accounted.",
        "",
    ]
    for eps, trials in searches.items():
        title = "non-private" if eps == 0 else f"record DP eps = {eps:g}"
        best = min(trials, key=lambda t: t.rmse)
        out += [f"Search, {title} (validation RMSE, kW):", "",
                "| stage | configuration | sigma | val RMSE | eps spent |", "|---|---|---|---|---|"]
        for t in sorted(trials, key=lambda t: t.rmse):
            mark = " **selected**" if t is best else ""
            spent = f"{t.spent:.3g}" if eps > 0 else "-"
            out.append(f"| {t.stage} | {describe(t.train)}{mark} | {t.train.dp_noise:.3g} | "
                       f"{t.rmse:.2f} | {spent} |")
        out.append("")
    base = finals[0.0]
    out += ["Test (selected configurations, trained on all training rows, scored once on the test "
            f"rows; seeds {args.test_seeds}, the first is the reported figure, the others show "
            "the run-to-run spread):", "",
            "| configuration | selected hyper-parameters | sigma | test RMSE kW (seed "
            f"{args.test_seeds[0]}) | vs non-private | all seeds | eps spent |",
            "|---|---|---|---|---|---|---|"]
    for eps, runs in finals.items():
        title = "non-private" if eps == 0 else f"record DP eps = {eps:g}"
        gap = 100 * (runs[0].rmse - base[0].rmse) / base[0].rmse
        spent = f"{max(r.spent for r in runs):.3g}" if eps > 0 else "-"
        seeds = ", ".join(f"{r.rmse:.2f}" for r in runs)
        out.append(f"| {title} | {describe(runs[0].train)} | {runs[0].train.dp_noise:.3g} | "
                   f"{runs[0].rmse:.2f} | {gap:+.1f}% | {seeds} | {spent} |")
    out += ["", END]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--max-rows", type=int, default=10000)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 8.0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t_start = time.perf_counter()
    dataset = load_dataset("wind", gateways=4, max_rows_per_unit=args.max_rows, seed=args.seed)
    fit, sizes = validation_split(dataset)
    base = default_train_config(dataset)
    bench = Bench(dataset, default_spec(dataset), base, args.rounds, args.seed)
    searches: dict[float, list[Trial]] = {}
    for eps in [0.0, *args.epsilons]:
        searches[eps] = search(fit, bench, base, eps, args.seed)
    finals: dict[float, list[Trial]] = {}
    for eps, trials in searches.items():
        chosen = msgspec.structs.replace(min(trials, key=lambda t: t.rmse).train, dp_noise=0.0)
        finals[eps] = []
        for seed in args.test_seeds:
            b = Bench(dataset, bench.spec, base, args.rounds, seed)
            t = Trial("test", chosen, eps)
            t.train, t.rmse, t.spent, t.seconds = run(dataset, b, chosen, eps, seed)
            finals[eps].append(t)
            print(f"TEST eps={eps:g} seed={seed} {describe(t.train)} sigma={t.train.dp_noise:.3g} "
                  f"test_rmse={t.rmse:.2f} spent={t.spent:.3g}", flush=True)
    full_sizes = {name: u.num_train for name, u in dataset.units.items()}
    text = render(args, sizes, full_sizes, searches, finals, time.perf_counter() - t_start)
    print()
    print(text)
    if args.out is not None:
        old = args.out.read_text() if args.out.exists() else ""
        if BEGIN in old and END in old:
            new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
        else:
            new = old.rstrip("\n") + "\n\n" + text + "\n"
        args.out.write_text(new)


if __name__ == "__main__":
    main()
