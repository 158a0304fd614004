"""Downlink encodings of the global model on the real wind data: accuracy against bytes down.

Each mode (``fp32``, ``int8``, ``delta``) runs ``--rounds`` rounds of the real round
protocol in one process (``bench/harness.py``: the aggregator's and the gateways' state
machines, the real codec, real local training on each turbine's rows, FedAvg, no broker)
from the same initial model and records:

- the final test RMSE of the model *as the gateways hold it* (decoded from the messages
  with ``edge.participant.receive_model``, exactly what a gateway runs) and of the
  aggregator's float master;
- the largest gap |master - held| after the last round;
- downlink bytes per gateway per round: the encoded ``model`` envelope alone and model +
  ``round`` announcement (unsigned; the harness's ``down``), and what zstd (level 3) would
  make of the model envelope (not used on the wire; it shows what entropy coding could add).

The harness decodes the final model with a plain fp32 decoder; this script overrides that
one method to decode as a gateway does, so int8 and delta runs are scored correctly.

Run: python bench/bench_downlink.py [--rounds 20] [--max-rows 10000] [--out bench/RESULTS_downlink.md]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import AGGREGATOR, InMemoryFederation, wire_bytes  # noqa: E402

from aggregator.rounds import RoundConfig  # noqa: E402
from edge import participant as edge  # noqa: E402
from fedcore.datasets import (  # noqa: E402
    default_spec,
    default_train_config,
    evaluate_dataset,
    load_dataset,
)
from fedcore.learning.models import init_params  # noqa: E402
from fedcore.learning.params import Params, num_parameters  # noqa: E402
from fedcore.protocol import codec  # noqa: E402
from fedcore.protocol.messages import GlobalModel, Kind  # noqa: E402


class DownlinkFederation(InMemoryFederation):
    """The harness, decoding each model message as a gateway does and sizing it."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.held_version = -1
        self.model_sizes: list[int] = []
        self.zstd_sizes: list[int] = []
        self.encodings: list[str] = []

    def _publish_model(self, model: GlobalModel) -> None:
        data = wire_bytes(Kind.MODEL, model, AGGREGATOR, model.round, self.now)
        self.model_sizes.append(len(data))
        self.zstd_sizes.append(len(zstandard.ZstdCompressor(level=3).compress(data)))
        self.encodings.append(model.encoding)
        received = codec.decode_body(codec.decode(data), GlobalModel)
        held = None if self.held_version < 0 else self.final_weights
        weights = edge.receive_model(received, self.held_version, held)
        assert weights is not None, "the observer missed a version"
        self.held_version, self.final_weights = received.version, weights
        self._pending_model_bytes = len(data)
        for g in self.gateways.values():
            self._deliver(g, edge.ModelReceived(self.now, received))


def run_mode(mode: str, full_every: int, args: argparse.Namespace) -> dict[str, object]:
    dataset = load_dataset("wind", gateways=args.gateways, max_rows_per_unit=args.max_rows, seed=args.seed)
    spec = default_spec(dataset)
    train = default_train_config(dataset)
    start: Params = init_params(spec, np.random.default_rng(args.seed))
    config = RoundConfig(rounds=args.rounds, min_participants=len(dataset.units), train=train,
                         downlink=mode, downlink_full_every=full_every)
    t0 = time.perf_counter()
    fed = DownlinkFederation(dataset, spec, config, start, seed=args.seed,
                             evaluate=lambda p: evaluate_dataset(dataset, spec, p))
    result = fed.run()
    master = fed.server.weights
    held = result.final_weights
    # messages that started a round (the last one is the final model, counted apart)
    sizes, zsizes = fed.model_sizes[:-1], fed.zstd_sizes[:-1]
    return {
        "mode": mode if mode != "delta" else f"delta (full every {full_every or 'never'})",
        "params": num_parameters(start),
        "rmse_held": result.records[-1].metrics["rmse"],
        "rmse_master": evaluate_dataset(dataset, spec, master)["rmse"],
        "gap": max(float(np.max(np.abs(m - h))) for m, h in zip(master, held, strict=True)),
        "model_bytes": float(np.mean(sizes)),
        "zstd_bytes": float(np.mean(zsizes)),
        "down": result.mean_down(),
        "encodings": ",".join(sorted(set(fed.encodings))),
        "curve": [round(r.metrics["rmse"], 2) for r in result.records],
        "seconds": time.perf_counter() - t0,
    }


def render(rows: list[dict[str, object]], args: argparse.Namespace, command: str) -> str:
    base = float(rows[0]["model_bytes"])  # type: ignore[arg-type]
    lines = [
        "# Downlink encodings of the global model (wind data)",
        "",
        f"Command: `{command}`",
        "",
        f"Wind data, {args.gateways} gateways, max {args.max_rows} rows per turbine, "
        f"{args.rounds} rounds, seed {args.seed}, FedAvg. {rows[0]['params']} parameters. Bytes are per gateway per "
        "round, unsigned envelopes (a signature adds 64).",
        "",
        "| mode | RMSE held (kW) | RMSE master (kW) | max abs(master - held) | model env. B | x smaller | "
        "model + round B | zstd(model) B | messages | s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rmse_held']:.3f} | {r['rmse_master']:.3f} | {r['gap']:.2e} | "
            f"{r['model_bytes']:.0f} | {base / float(r['model_bytes']):.2f} | {r['down']:.0f} | "  # type: ignore[arg-type]
            f"{r['zstd_bytes']:.0f} | {r['encodings']} | {r['seconds']:.0f} |"
        )
    lines += ["", "RMSE per round (model as held by the gateways):", ""]
    lines += [f"- {r['mode']}: {r['curve']}" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--gateways", type=int, default=4)
    parser.add_argument("--max-rows", type=int, default=10000)
    parser.add_argument("--full-every", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for mode, every in (("fp32", 0), ("int8", 0), ("delta", args.full_every), ("delta", 0)):
        rows.append(run_mode(mode, every, args))
        print(rows[-1], flush=True)
    text = render(rows, args, "python " + " ".join(sys.argv))
    print(text)
    if args.out is not None:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
