"""Float vs int8 .tflite on a real data set, run in the LiteRT interpreter.

Trains one MLP on the pooled training rows of every unit (this measures what quantization
costs, not federation), then scores on the pooled test rows:

- ``numpy float``: the trained params in numpy (``fedcore.learning.models.forward``);
- ``tflite float32``: ``export_float`` run by LiteRT;
- ``tflite int8 PTQ``: ``export_int8`` with min/max ranges calibrated on training rows;
- ``tflite int8 QAT``: the float model fine-tuned with ``quant.qat_loss_and_grads`` (STE)
  for a few epochs, ranges refreshed by EMA, then exported to int8.

Regression reports R^2 in percent (the "points" of the accuracy claim), RMSE and MAE in the
target's unit; classification reports accuracy in percent. Usage::

    python bench/bench_int8.py --dataset wind --epochs 8 --qat-epochs 3
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from edge.inference import InferenceEngine
from fedcore.datasets import load_dataset
from fedcore.learning import models, quant, tflite_export
from fedcore.learning.optim import make_optimizer
from fedcore.learning.params import Params
from fedcore.learning.training import train_local
from fedcore.protocol.messages import ModelSpec, TrainConfig


def _pooled(ds: object, split: str) -> tuple[np.ndarray, np.ndarray]:
    units = ds.units.values()  # type: ignore[attr-defined]
    x = np.concatenate([getattr(u, f"x_{split}") for u in units]).astype(np.float32)
    y = np.concatenate([getattr(u, f"y_{split}") for u in units])
    return x, y


def _score(task: str, y: np.ndarray, out: np.ndarray, target_std: float) -> dict[str, float]:
    if task == "classification":
        return {"accuracy_%": 100.0 * float(np.mean(out.argmax(axis=1) == y))}
    pred = out.reshape(-1).astype(np.float64)
    truth = y.reshape(-1).astype(np.float64)
    resid = pred - truth
    r2 = 1.0 - float(np.sum(resid**2) / np.sum((truth - truth.mean()) ** 2))
    return {
        "r2_%": 100.0 * r2,
        "rmse": float(np.sqrt(np.mean(resid**2))) * target_std,
        "mae": float(np.mean(np.abs(resid))) * target_std,
    }


def _qat_finetune(
    spec: ModelSpec,
    params: Params,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    rng: np.random.Generator,
    calib: np.ndarray,
) -> tuple[Params, quant.ActivationRanges]:
    ranges = quant.calibrate_ranges(spec, params, calib)
    opt = make_optimizer("adam", lr)
    state = opt.init(params)
    for _ in range(epochs):
        order = rng.permutation(len(x))
        for start in range(0, len(x), 64):
            idx = order[start : start + 64]
            _, grads = quant.qat_loss_and_grads(spec, params, x[idx], y[idx], ranges)
            params, state = opt.step(params, grads, state)
        ranges = quant.ema_ranges(ranges, quant.observe_ranges(spec, params, calib), 0.5)
    return params, ranges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--dataset", default="wind")
    ap.add_argument("--hidden", default="32,16")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--qat-epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    ds = load_dataset(args.dataset)
    x_train, y_train = _pooled(ds, "train")
    x_test, y_test = _pooled(ds, "test")
    task = ds.task
    n_out = ds.num_classes if task == "classification" else 1
    hidden = tuple(int(h) for h in args.hidden.split(","))
    spec = ModelSpec(kind="mlp", layer_sizes=(x_train.shape[1], *hidden, n_out), task=task)
    target_std = 1.0 if task == "classification" else float(ds.scaler.target_std)
    if task == "classification":
        y_train, y_test = y_train.astype(np.int64), y_test.astype(np.int64)

    t0 = time.perf_counter()
    params = models.init_params(spec, rng)
    config = TrainConfig(
        local_epochs=args.epochs, batch_size=64, learning_rate=args.lr, optimizer="adam"
    )
    params, result = train_local(spec, params, x_train, y_train, config, rng)
    train_s = time.perf_counter() - t0

    calib = x_train[rng.choice(len(x_train), size=min(2000, len(x_train)), replace=False)]
    float_bytes = tflite_export.export_float(spec, params)
    ptq_bytes = tflite_export.export_int8(spec, params, calib)
    qat_params, qat_ranges = _qat_finetune(
        spec, [p.copy() for p in params], x_train, y_train, args.qat_epochs, args.lr / 3, rng, calib
    )
    qat_bytes = tflite_export.export_int8(spec, qat_params, ranges=qat_ranges)

    logits = models.forward(spec, params, x_test)
    rows = [("numpy float", None, _score(task, y_test, logits, target_std))]
    for name, blob in (
        ("tflite float32", float_bytes),
        ("tflite int8 PTQ", ptq_bytes),
        ("tflite int8 QAT", qat_bytes),
    ):
        engine = InferenceEngine.from_bytes(blob)
        engine.predict(x_test)  # warm-up: sizes and allocates the tensors for this batch
        start = time.perf_counter()
        out = engine.predict(x_test)
        per_sample_us = (time.perf_counter() - start) / len(x_test) * 1e6
        scores = _score(task, y_test, out, target_std)
        scores["us/sample"] = per_sample_us
        rows.append((name, len(blob), scores))

    print(
        f"dataset={ds.name} task={task} units={len(ds.units)} train={len(x_train)} test={len(x_test)}"
    )
    print(
        f"model={spec.layer_sizes} activation={spec.activation} params={sum(p.size for p in params)}"
    )
    print(
        f"float training: {args.epochs} epochs adam lr={args.lr}, final loss {result.loss:.4f}, {train_s:.1f} s"
    )
    print(f"QAT fine-tune: {args.qat_epochs} epochs adam lr={args.lr / 3:g}")
    unit = f" ({ds.target_unit})" if getattr(ds, "target_unit", "") else ""
    keys = list(rows[-1][2].keys())
    print()
    print(
        "| model | bytes | "
        + " | ".join(k + (unit if k in ("rmse", "mae") else "") for k in keys)
        + " |"
    )
    print("|---|---:|" + "---:|" * len(keys))
    for name, size, scores in rows:
        cells = [f"{scores[k]:.3f}" if k in scores else "" for k in keys]
        print(f"| {name} | {size if size is not None else ''} | " + " | ".join(cells) + " |")
    base = rows[1][2]
    main_key = "accuracy_%" if task == "classification" else "r2_%"
    for name, _, scores in rows[2:]:
        print(
            f"{name}: {main_key} {scores[main_key] - base[main_key]:+.3f} points vs tflite float32"
        )


if __name__ == "__main__":
    main()
