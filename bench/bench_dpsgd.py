"""Record-level DP (DP-SGD on each gateway) on the real wind data, against the non-private run.

Same federation, data, model, local training and rounds as ``bench/bench_pipeline.py`` (so
its rows compare with RESULTS_pipeline.md), but the privacy is DP-SGD inside local training
(``TrainConfig.dp_clip``/``dp_noise``, ``fedcore/privacy/dpsgd.py``): Poisson-sampled
batches at q = batch_size / n, per-example gradients clipped to ``--clip`` and Gaussian
noise sigma * clip on each summed batch gradient. For each target epsilon, sigma comes from
``record_noise_multiplier_for`` with ``min_records`` = the smallest gateway's training rows
(the aggregator's lower bound), and the aggregator's ledger (level "record") charges each
gateway with its own q and steps; the table reports the largest per-gateway epsilon spent.

Run: python bench/bench_dpsgd.py [--rounds 20] [--max-rows N] [--out bench/RESULTS_dpsgd.md]
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import Bench, Row, _line, row_from  # noqa: E402
from harness import run_federation  # noqa: E402

from aggregator.privacy import PrivacyLedger, record_charge, record_noise_multiplier_for  # noqa: E402
from aggregator.rounds import RoundConfig  # noqa: E402
from fedcore.datasets import default_spec, default_train_config, load_dataset  # noqa: E402
from fedcore.learning.params import num_parameters  # noqa: E402
from fedcore.protocol.messages import PipelineConfig, TrainConfig  # noqa: E402

DELTA = 1e-5


def record_run(bench: Bench, train: TrainConfig, epsilon: float) -> Row:
    config = RoundConfig(rounds=bench.rounds, min_participants=len(bench.dataset.units),
                         train=train, pipeline=PipelineConfig())
    ledger = PrivacyLedger(epsilon, DELTA, "stop", level="record")
    t0 = time.perf_counter()
    result = run_federation(bench.dataset, bench.spec, config, bench.start, seed=bench.seed,
                            ledger=ledger, evaluate=bench.evaluate)
    row = row_from(f"record DP eps={epsilon:g}", result, time.perf_counter() - t0,
                   train.dp_clip, train.dp_noise)
    print(_line(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--clip", type=float, default=1.0, help="per-example clip norm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t_start = time.perf_counter()
    dataset = load_dataset("wind", gateways=args.gateways, max_rows_per_unit=args.max_rows, seed=args.seed)
    spec = default_spec(dataset)
    base_train = default_train_config(dataset)
    bench = Bench(dataset, spec, base_train, args.rounds, args.seed)
    sizes = {name: u.num_train for name, u in dataset.units.items()}
    min_records = min(sizes.values())
    base, _ = bench.federated("none (fp32)", PipelineConfig())
    rows = [base]
    clip_only = msgspec.structs.replace(base_train, dp_clip=args.clip)
    rows.append(record_run(bench, clip_only, 1e9))  # clipping + Poisson sampling, no noise
    rows[-1].name = f"clip {args.clip:g} only (no noise)"
    for eps in args.epsilons:
        z = record_noise_multiplier_for(eps, DELTA, clip_only, args.rounds, min_records)
        rows.append(record_run(bench, msgspec.structs.replace(clip_only, dp_noise=z), eps))
    wall = time.perf_counter() - t_start
    q, steps = record_charge(clip_only, min_records)
    lines = [
        "| configuration | C_r | sigma | RMSE kW | vs none | ROC AUC | r95 | eps spent (max gateway) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        eps = f"{row.epsilon:.3g}" if row.z > 0 else "-"
        lines.append(f"| {row.name} | {row.clip:.3g} | {row.z:.3g} | {row.rmse:.2f} | "
                     f"{100 * (row.rmse - base.rmse) / base.rmse:+.1f}% | {row.roc_auc:.3f} | "
                     f"{row.r95} | {eps} |")
    marks = sorted({m for m in (1, 2, 5, 10, args.rounds) if 1 <= m <= args.rounds})
    curves = ["| configuration | " + " | ".join(f"r{m}" for m in marks) + " |",
              "|---|" + "---|" * len(marks)]
    for row in rows:
        curves.append(f"| {row.name} | " + " | ".join(f"{row.curve[m - 1]:.1f}" for m in marks) + " |")
    text = "\n".join([
        "# Record-level DP (DP-SGD) on the wind data (bench/bench_dpsgd.py)",
        "",
        f"Command: `python {' '.join(sys.argv)}`  ",
        f"Date: {datetime.date.today().isoformat()}; whole run {wall / 60:.1f} min on a shared "
        "2-core machine (sequential runs).",
        "",
        f"Data: La Haute Borne wind SCADA, {len(sizes)} gateways, training rows per gateway "
        f"{sizes}" + (f" (subsampled: max {args.max_rows} per unit)" if args.max_rows else "")
        + f". Model {spec.layer_sizes} ({num_parameters(bench.start)} parameters), local training "
        f"{base_train}. {args.rounds} rounds, FedAvg, all gateways every round, seed {args.seed}.",
        "",
        f"Calibration: `record_noise_multiplier_for(eps, {DELTA:g}, train, {args.rounds}, "
        f"min_records={min_records})`: q = {q:.4g}, {steps} steps per round, "
        f"{steps * args.rounds} steps over the run. Ledger: level \"record\", each gateway "
        "charged with its own q = batch/n and steps; `eps spent` is the largest over gateways.",
        "",
        *lines,
        "",
        "RMSE (kW) of the global model after round r:",
        "",
        *curves,
        "",
    ])
    print()
    print(text)
    if args.out is not None:
        mark = "<!-- reading: kept across runs -->"
        reading = mark + "\n"
        if args.out.exists() and mark in (old := args.out.read_text()):
            reading = old[old.index(mark):]
        args.out.write_text(text + "\n" + reading)


if __name__ == "__main__":
    main()
