"""Compression and differential privacy on the real wind data: accuracy against wire bytes.

Each configuration runs ``--rounds`` rounds of the real round protocol in one process
(``bench/harness.py``: the aggregator's and the gateways' state machines, the real codec and
update pipeline, real local training on each turbine's own rows, FedAvg, no broker) from the
same initial model, and records:

- final test RMSE (kW, normal rows) and ROC AUC of the global model (``evaluate_dataset``);
- ``r95``: the first round r with ``(rmse_r - rmse_final) / rmse_final <= 0.05``;
- uplink bytes per gateway per round (the encoded ``update`` envelope) and downlink (the
  ``model`` envelope plus the ``round`` announcement that start the round), unsigned;
- the uplink ratio against the uncompressed run's update envelope (``x env``) and against
  the raw float32 delta alone (``x fp32``, 4 bytes per parameter, no envelope);
- epsilon spent (the largest per gateway, from the aggregator's ``PrivacyLedger``).

Configurations: none; int8; topk:0.1 (error feedback is always on with top-k); topk:0.01 +
int8 + zstd; DP (clip + Gaussian noise on each gateway, per-gateway local DP, docs/privacy.md)
at each ``--epsilons`` value with delta 1e-5, the noise multiplier calibrated by the RDP
accountant for ``--rounds`` contributions at sampling rate 1, with no compression and with
topk:0.01 + int8 + zstd. The DP clip norm is the median pre-clip update norm reported by
the gateways in the non-private run (so about half the updates are clipped). A second
non-private run with another seed shows the run-to-run spread. The centralized reference
trains one model on the pooled rows of all turbines with the same compute: per round, as many
optimizer steps (same batch, optimizer, learning rate) as all gateways together take.

Run: python bench/bench_pipeline.py [--rounds 20] [--max-rows N] [--out bench/RESULTS_pipeline.md]
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import RunResult, run_federation  # noqa: E402

from aggregator.privacy import PrivacyLedger, noise_multiplier_for  # noqa: E402
from aggregator.rounds import RoundConfig  # noqa: E402
from fedcore.datasets import (  # noqa: E402
    FederatedDataset,
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.learning.models import init_params  # noqa: E402
from fedcore.learning.params import Params, num_parameters  # noqa: E402
from fedcore.learning.training import train_local  # noqa: E402
from fedcore.protocol.messages import ModelSpec, PipelineConfig, TrainConfig  # noqa: E402

DELTA = 1e-5
COMPRESSED = ("topk:0.01", "int8", "zstd")
READING_MARK = "<!-- reading: kept across runs -->"


@dataclass
class Row:
    name: str
    rmse: float
    roc_auc: float
    r95: int
    up: float = math.nan
    down: float = math.nan
    clip: float = 0.0
    z: float = 0.0
    epsilon: float = 0.0
    curve: tuple[float, ...] = ()
    rejected: str = ""
    seconds: float = 0.0


def rounds_to_95(curve: list[float]) -> int:
    """First round (1-based) whose RMSE is within 5% (relative) of the final RMSE."""
    final = curve[-1]
    for r, value in enumerate(curve, start=1):
        if (value - final) / final <= 0.05:
            return r
    return len(curve)


def row_from(name: str, result: RunResult, seconds: float, clip: float = 0.0, z: float = 0.0) -> Row:
    curve = [r.metrics["rmse"] for r in result.records]
    last = result.records[-1]
    return Row(
        name=name,
        rmse=curve[-1],
        roc_auc=last.metrics.get("roc_auc", math.nan),
        r95=rounds_to_95(curve),
        up=result.mean_up(),
        down=result.mean_down(),
        clip=clip,
        z=z,
        epsilon=max(last.epsilon.values(), default=0.0),
        curve=tuple(curve),
        rejected=",".join(f"{k}={v}" for k, v in sorted(result.rejected.items())),
        seconds=seconds,
    )


class Bench:
    def __init__(self, dataset: FederatedDataset, spec: ModelSpec, train: TrainConfig,
                 rounds: int, seed: int) -> None:
        self.dataset, self.spec, self.train, self.rounds, self.seed = dataset, spec, train, rounds, seed
        self.start: Params = init_params(spec, np.random.default_rng(seed))

    def evaluate(self, params: Params) -> dict[str, float]:
        return evaluate_dataset(self.dataset, self.spec, params)

    def federated(self, name: str, pipeline: PipelineConfig, epsilon: float = 0.0,
                  seed_offset: int = 0) -> tuple[Row, RunResult]:
        config = RoundConfig(
            rounds=self.rounds,
            min_participants=len(self.dataset.units),
            train=self.train,
            pipeline=pipeline,
        )
        ledger = PrivacyLedger(epsilon, DELTA, "stop") if epsilon > 0 else None
        t0 = time.perf_counter()
        result = run_federation(self.dataset, self.spec, config, self.start,
                                seed=self.seed + seed_offset, ledger=ledger, evaluate=self.evaluate)
        row = row_from(name, result, time.perf_counter() - t0, pipeline.clip_norm, pipeline.noise_multiplier)
        print(_line(row), flush=True)
        return row, result

    def centralized(self) -> Row:
        units = list(self.dataset.units.values())
        x = np.concatenate([u.x_train for u in units])
        y = np.concatenate([u.y_train for u in units])
        # one "round" = the optimizer steps all gateways take together in a federated round
        steps = self.train.max_steps * len(units) if self.train.max_steps else 0
        epochs = self.train.local_epochs if steps else self.train.local_epochs * len(units)
        config = msgspec.structs.replace(self.train, max_steps=steps, local_epochs=max(epochs, 1))
        rng = np.random.default_rng([self.seed, 99])
        params, curve, auc = self.start, [], math.nan
        t0 = time.perf_counter()
        for _ in range(self.rounds):
            params, _ = train_local(self.spec, params, x, y, config, rng)
            report = self.evaluate(params)
            curve.append(report["rmse"])
            auc = report.get("roc_auc", math.nan)
        row = Row("centralized (pooled rows, same steps)", curve[-1], auc, rounds_to_95(curve),
                  curve=tuple(curve), seconds=time.perf_counter() - t0)
        print(_line(row), flush=True)
        return row


def _line(row: Row) -> str:
    return (f"{row.name:<34} rmse={row.rmse:7.2f} auc={row.roc_auc:.3f} r95={row.r95:>2} "
            f"up={row.up:8.0f} down={row.down:8.0f} eps={row.epsilon:.3g} ({row.seconds:.0f} s)")


def run(args: argparse.Namespace) -> tuple[list[Row], dict[str, object]]:
    dataset = load_dataset("wind", gateways=args.gateways, max_rows_per_unit=args.max_rows, seed=args.seed)
    spec = default_spec(dataset)
    train = default_train_config(dataset)
    bench = Bench(dataset, spec, train, args.rounds, args.seed)
    rows: list[Row] = []
    base, base_result = bench.federated("none (fp32)", PipelineConfig())
    rows.append(base)
    norms = [n for r in base_result.records for n in r.pre_clip_norms.values()]
    clip = float(np.median(norms))
    for name, stages in (("int8", ("int8",)), ("int8+zstd", ("int8", "zstd")),
                         ("topk:0.1 +EF", ("topk:0.1",)),
                         ("topk:0.1+int8+zstd +EF", ("topk:0.1", "int8", "zstd")),
                         ("topk:0.01+int8+zstd +EF", COMPRESSED)):
        rows.append(bench.federated(name, PipelineConfig(compression=stages))[0])
    rows.append(bench.federated("none (fp32), seed +1", PipelineConfig(), seed_offset=1)[0])
    for eps in args.epsilons:
        z = noise_multiplier_for(eps, DELTA, args.rounds, 1.0)
        for suffix, stages in (("", ()), (" +topk:0.01+int8+zstd", COMPRESSED)):
            pipeline = PipelineConfig(clip_norm=clip, noise_multiplier=z, compression=stages)
            rows.append(bench.federated(f"DP eps={eps:g}{suffix}", pipeline, epsilon=eps)[0])
    if not args.skip_centralized:
        rows.append(bench.centralized())
    context = {
        "dataset": dataset,
        "spec": spec,
        "train": train,
        "params": num_parameters(bench.start),
        "clip": clip,
        "norms": (float(np.min(norms)), float(np.median(norms)), float(np.max(norms))),
        "initial": base_result.initial_metrics,
        "final_model_bytes": base_result.final_model_bytes,
    }
    return rows, context


def render(rows: list[Row], ctx: dict[str, object], args: argparse.Namespace, wall: float) -> str:
    base = rows[0]
    fp32 = 4 * int(ctx["params"])  # type: ignore[call-overload]
    ds = ctx["dataset"]
    assert isinstance(ds, FederatedDataset)
    lines = [
        "| configuration | C | z | RMSE kW | vs none | ROC AUC | r95 | up B | down B | up x env | up x fp32 | eps spent |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        fed = not math.isnan(row.up)
        lines.append(
            f"| {row.name} | {row.clip:.3g} | {row.z:.3g} | {row.rmse:.2f} | "
            f"{100 * (row.rmse - base.rmse) / base.rmse:+.1f}% | {row.roc_auc:.3f} | {row.r95} | "
            + (f"{row.up:.0f} | {row.down:.0f} | {base.up / row.up:.1f} | {fp32 / row.up:.1f} | "
               if fed else "- | - | - | - | ")
            + (f"{row.epsilon:.3g} |" if row.z > 0 else "- |")
        )
    marks = [1, 2, 5, 10, args.rounds // 2, args.rounds]
    marks = sorted({m for m in marks if 1 <= m <= args.rounds})
    curves = ["| configuration | " + " | ".join(f"r{m}" for m in marks) + " |",
              "|---|" + "---|" * len(marks)]
    for row in rows:
        curves.append(f"| {row.name} | " + " | ".join(f"{row.curve[m - 1]:.1f}" for m in marks) + " |")
    checks = []
    for row in rows:
        if row.z == 0 and not math.isnan(row.up) and row is not base and "seed" not in row.name:
            ok = base.up / row.up >= 10 and row.rmse <= 1.01 * base.rmse
            checks.append(f"- {row.name}: {base.up / row.up:.1f}x fewer uplink bytes, RMSE "
                          f"{100 * (row.rmse - base.rmse) / base.rmse:+.2f}% -> "
                          f"{'meets' if ok else 'misses'} (>= 10x at <= 1% RMSE)")
    for row in rows:
        if row.z > 0 and row.name.startswith("DP eps=2"):
            ok = row.rmse <= 1.03 * base.rmse
            checks.append(f"- {row.name}: RMSE {100 * (row.rmse - base.rmse) / base.rmse:+.1f}% vs "
                          f"non-private -> {'meets' if ok else 'misses'} (<= 3% RMSE)")
    rejected = [f"{r.name}: {r.rejected}" for r in rows if r.rejected]
    initial = ctx["initial"]
    assert isinstance(initial, dict)
    norms = ctx["norms"]
    assert isinstance(norms, tuple)
    cmd = "python " + " ".join(sys.argv)
    return "\n".join([
        "# Update pipeline on the wind data: compression and DP (bench/bench_pipeline.py)",
        "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.date.today().isoformat()}; whole run {wall / 60:.1f} min on one core of a "
        "shared 2-core machine (sequential runs).",
        "",
        f"Data: La Haute Borne wind SCADA, {len(ds.units)} gateways (turbines), "
        f"{sum(u.num_train for u in ds.units.values())} training rows"
        + (f" (subsampled: max {args.max_rows} per unit)" if args.max_rows else " (all)")
        + f", test on normal rows of every turbine. Model {ctx['spec'].layer_sizes} "  # type: ignore[attr-defined]
        f"({ctx['params']} parameters, {fp32} B as raw fp32), local training {ctx['train']}. "
        f"{args.rounds} rounds, FedAvg, all gateways every round, seed {args.seed}. "
        f"Initial model RMSE {initial.get('rmse', math.nan):.1f} kW.",
        "",
        "Columns: `C` clip norm, `z` noise multiplier (sigma = zC per coordinate); RMSE of the "
        "final global model in kW (normal test rows) and `vs none` relative to the non-private "
        "uncompressed run; `r95` first round r with (rmse_r - rmse_final)/rmse_final <= 0.05; "
        "`up B` mean encoded update envelope per gateway per round; `down B` model envelope + "
        "round announcement per gateway per round (unsigned; a signature adds 64 B to each "
        "message); `up x env` = none's update envelope / this one; `up x fp32` = raw fp32 delta "
        f"({fp32} B, no envelope) / this envelope; `eps spent` the largest per-gateway epsilon "
        "in the aggregator's ledger after the last round (delta 1e-5).",
        "",
        *lines,
        "",
        f"DP clip norm C = {ctx['clip']:.4g}: the median of the pre-clip update norms the gateways "
        f"reported in the non-private run (min {norms[0]:.3g}, median {norms[1]:.3g}, max "
        f"{norms[2]:.3g} over all gateways and rounds). Noise multipliers from "
        f"`noise_multiplier_for(eps, 1e-5, {args.rounds}, 1.0)`.",
        "",
        "RMSE (kW) of the global model after round r:",
        "",
        *curves,
        "",
        "Targets, as measured (\"1 point\" of RMSE read as 1% relative, \"3 points\" as 3%):",
        "",
        *checks,
        "",
        "Rejected updates: " + ("; ".join(rejected) if rejected else "none"),
        "",
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--max-rows", type=int, default=None, help="subsample each unit's rows")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[0.5, 1, 2, 4, 8])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-centralized", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="write the results as markdown here")
    args = parser.parse_args()
    t0 = time.perf_counter()
    rows, ctx = run(args)
    text = render(rows, ctx, args, time.perf_counter() - t0)
    print()
    print(text)
    if args.out is not None:
        reading = ""
        if args.out.exists():
            old = args.out.read_text()
            if READING_MARK in old:
                reading = old[old.index(READING_MARK):]
        args.out.write_text(text + "\n" + (reading or READING_MARK + "\n"))


if __name__ == "__main__":
    main()
