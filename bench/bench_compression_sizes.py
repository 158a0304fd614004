"""Uplink bytes of one model update under each compression setting (pure numpy, no broker).

For a 932-parameter MLP (24 -> 32 -> 4, the bench comparison model) and a ~10k-parameter
MLP (24 -> 128 -> 52 -> 4) this encodes synthetic deltas with ``fedcore.pipeline`` and
reports, per setting:

- ``delta B``: msgpack size of the ``EncodedDelta`` (what the pipeline controls);
- ``update B``: size of the whole unsigned ``ModelUpdate`` envelope as published (header,
  ids, stats); an Ed25519 signature adds 64 bytes to every row;
- ``x fp32``: raw float32 model bytes / delta bytes;
- ``x wire``: update bytes of the uncompressed setting / update bytes (whole message);
- ``err 1``: relative L2 error of one decoded update vs the delta;
- ``err EF``: relative L2 error of the *sum* of 20 decoded updates vs the sum of the 20
  deltas, with error feedback (what the global model actually integrates).

Deltas are Student-t (3 degrees of freedom) per coordinate, scaled per layer: heavy tails
like real SGD deltas, but synthetic, so only the byte counts are claims, not accuracy.

Run: python bench/bench_compression_sizes.py
"""

from __future__ import annotations

import math

import numpy as np

from fedcore.learning.params import flatten
from fedcore.pipeline import EdgePipelineState, decode_update, encode_update
from fedcore.protocol import codec
from fedcore.protocol.messages import Kind, ModelUpdate, PipelineConfig

MODELS = {"mlp-932": (24, 32, 4), "mlp-10k": (24, 128, 52, 4)}
SETTINGS: list[tuple[str, PipelineConfig]] = [
    ("none (fp32)", PipelineConfig()),
    ("zstd", PipelineConfig(compression=("zstd",))),
    ("int8", PipelineConfig(compression=("int8",))),
    ("int8+zstd", PipelineConfig(compression=("int8", "zstd"))),
    ("topk:0.1", PipelineConfig(compression=("topk:0.1",))),
    ("topk:0.1+int8+zstd", PipelineConfig(compression=("topk:0.1", "int8", "zstd"))),
    ("topk:0.01+int8+zstd", PipelineConfig(compression=("topk:0.01", "int8", "zstd"))),
    ("clip+noise z=1 +topk:0.01+int8+zstd",
     PipelineConfig(clip_norm=1.0, noise_multiplier=1.0, compression=("topk:0.01", "int8", "zstd"))),
]
ROUNDS = 20


def shapes_for(sizes: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
    shapes: list[tuple[int, ...]] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        shapes += [(a, b), (b,)]
    return tuple(shapes)


def synthetic_delta(rng: np.random.Generator, shapes: tuple[tuple[int, ...], ...]) -> list[np.ndarray]:
    out = []
    for shape in shapes:
        fan_in = shape[0] if len(shape) == 2 else 1
        out.append((rng.standard_t(3, shape) * 0.01 / math.sqrt(fan_in)).astype(np.float32))
    return out


def measure(shapes: tuple[tuple[int, ...], ...], config: PipelineConfig, seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    state = EdgePipelineState()
    sum_delta = sum_sent = None
    first: dict[str, float] = {}
    for r in range(ROUNDS):
        delta = synthetic_delta(rng, shapes)
        encoded, info = encode_update(delta, config, state, rng)
        sent = flatten(decode_update(encoded, shapes))
        d = flatten(delta)
        sum_delta = d.astype(np.float64) if sum_delta is None else sum_delta + d
        sum_sent = sent.astype(np.float64) if sum_sent is None else sum_sent + sent
        if r == 0:
            update = ModelUpdate(round=1, base_version=0, num_samples=1000, delta=encoded,
                                 train_loss=0.1, clipped=info.clipped, stats=info.as_stats())
            env = codec.make_envelope(Kind.UPDATE, "plant-1", "turbines", 1, "gw-0001", update, 1.7e9)
            first = {
                "delta_bytes": info.wire_bytes,
                "update_bytes": len(codec.encode(env)),
                "fp32_bytes": info.fp32_bytes,
                "err1": float(np.linalg.norm(sent - d) / np.linalg.norm(d)),
            }
    assert sum_delta is not None and sum_sent is not None
    first["err_ef"] = float(np.linalg.norm(sum_sent - sum_delta) / np.linalg.norm(sum_delta))
    return first


def main() -> None:
    for name, sizes in MODELS.items():
        shapes = shapes_for(sizes)
        n = sum(math.prod(s) for s in shapes)
        print(f"\n### {name}: layers {sizes}, {n} parameters, fp32 model = {4 * n} B\n")
        print("| setting | delta B | update B | x fp32 | x wire | err 1 | err EF (20 rounds) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        baseline = 0.0
        for label, config in SETTINGS:
            m = measure(shapes, config, seed=0)
            baseline = baseline or m["update_bytes"]
            print(f"| {label} | {m['delta_bytes']:.0f} | {m['update_bytes']:.0f} | "
                  f"{m['fp32_bytes'] / m['delta_bytes']:.1f} | {baseline / m['update_bytes']:.1f} | "
                  f"{m['err1']:.3f} | {m['err_ef']:.3f} |")


if __name__ == "__main__":
    main()
