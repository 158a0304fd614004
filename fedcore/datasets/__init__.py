"""Federated data sets: real plant data shipped with the package, a synthetic bench task, CSV.

``load_dataset(name, ...)`` returns a :class:`FederatedDataset`: one unit (gateway) per
turbine, battery cell or CSV unit, each with a time-respecting train/test split, scaled
with a :class:`Scaler` fitted on training rows only. ``default_spec`` and
``default_train_config`` give a model and local training settings measured to train in
well under a second per round per gateway on a 2-core machine (see
``bench/bench_datasets.py`` and ``bench/RESULTS_datasets.md`` for the numbers).

Loading reads the package's data files (or the CSV), so it belongs at the process edge
(CLI, demo, benchmarks), not inside a pure core.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcore.datasets.base import DatasetError, FederatedDataset, Scaler, UnitData
from fedcore.datasets.batteries import load_batteries
from fedcore.datasets.csvdata import load_csv
from fedcore.datasets.synthetic import load_synthetic
from fedcore.datasets.wind import load_wind
from fedcore.learning import metrics
from fedcore.learning.models import forward
from fedcore.learning.training import evaluate
from fedcore.protocol.messages import ModelSpec, TrainConfig

__all__ = [
    "DatasetError",
    "FederatedDataset",
    "Scaler",
    "UnitData",
    "default_spec",
    "default_train_config",
    "evaluate_dataset",
    "load_dataset",
]

NAMES = ("wind", "batteries", "synthetic", "csv:PATH")


def load_dataset(
    name: str,
    *,
    gateways: int | None = None,
    unit_column: str | None = None,
    target: str | None = None,
    features: Sequence[str] | None = None,
    task: str | None = None,
    max_rows_per_unit: int | None = None,
    seed: int = 0,
) -> FederatedDataset:
    """Load ``wind``, ``batteries``, ``synthetic`` or ``csv:PATH``.

    ``gateways``: wind 4 (turbines, default) or 8 (turbine x year); batteries keeps that many
    cells (most cycles first); synthetic makes that many (default 10); CSV keeps the largest
    units. ``unit_column``/``features``/``task`` are for CSV only; ``target`` for CSV and
    batteries (``soh`` or ``rul``). ``max_rows_per_unit`` subsamples each unit
    deterministically (from ``seed``) for quick tests and demos.
    """
    if name.startswith("csv:"):
        return load_csv(
            name[4:],
            unit_column=unit_column,
            target=target,
            features=features,
            task=task,
            gateways=gateways,
            max_rows_per_unit=max_rows_per_unit,
            seed=seed,
        )
    for key, value in (("unit_column", unit_column), ("features", features), ("task", task)):
        if value is not None:
            raise DatasetError(name, key, value, "only a csv:PATH data set takes this option")
    if name == "wind":
        if target not in (None, "P_avg"):
            raise DatasetError(name, "target", target, "the wind data set predicts P_avg")
        return load_wind(gateways=gateways, max_rows_per_unit=max_rows_per_unit, seed=seed)
    if name == "batteries":
        return load_batteries(gateways=gateways, target=target, seed=seed)
    if name == "synthetic":
        if target is not None:
            raise DatasetError(name, "target", target, "the synthetic data set has no choice")
        return load_synthetic(gateways=gateways, max_rows_per_unit=max_rows_per_unit, seed=seed)
    raise DatasetError("<dataset>", "name", name, f"must be one of {', '.join(NAMES)}")


def default_spec(dataset: FederatedDataset) -> ModelSpec:
    """A model for ``dataset``, sized from measurements (see the module docstring)."""
    n_in = len(dataset.features)
    if dataset.task == "classification":
        # 24 -> 32 -> 4 is 932 parameters, the size used in the bench comparisons.
        sizes: tuple[int, ...] = (n_in, 32, max(2, dataset.num_classes))
    else:
        sizes = (n_in, 32, 16, 1)
    return ModelSpec(
        kind="mlp",
        layer_sizes=sizes,
        activation="relu",
        task=dataset.task,
        features=dataset.features,
        target=dataset.target,
    )


def default_train_config(dataset: FederatedDataset) -> TrainConfig:
    """Local training per round for ``dataset`` (see the module docstring)."""
    if dataset.name == "wind":
        # A turbine has ~75k training rows; a cap keeps a round to ~0.2 s of compute.
        return TrainConfig(
            local_epochs=1, batch_size=64, learning_rate=0.003, optimizer="adam", max_steps=500
        )
    if dataset.name == "batteries":
        # Cells have 11..136 training cycles: several passes per round, small batches. Plain
        # SGD averaged better than Adam here (Adam's fresh per-round state moves every
        # weight by ~lr per step on a 2-step client, whatever its gradient says). lr 0.05
        # diverged on cell B0042 for 9 of 40 shuffling seeds; 0.02 for none.
        return TrainConfig(local_epochs=5, batch_size=8, learning_rate=0.02, optimizer="sgd")
    if dataset.name == "synthetic":
        return TrainConfig(local_epochs=1, batch_size=32, learning_rate=0.005, optimizer="adam")
    return TrainConfig(
        local_epochs=1, batch_size=32, learning_rate=0.003, optimizer="adam", max_steps=500
    )


def evaluate_dataset(
    dataset: FederatedDataset,
    spec: ModelSpec,
    params: Sequence[np.ndarray],
    unit: str | None = None,
) -> dict[str, float]:
    """Test metrics of ``params`` on one unit or, by default, on every unit's test rows.

    Regression errors (``rmse``, ``mae``, ``mse``) are on the target's original scale
    (``dataset.target_unit``, e.g. kW) and, where the data set labels anomalies, measured on
    normal rows only: a normal-behaviour model is judged on normal behaviour, and its
    ``roc_auc`` (absolute residual against the labels, all test rows) on the anomalies.
    A unit without test rows (a battery cell shorter than 17 cycles) raises ``ValueError``.
    """
    if unit is None:
        x, y, labels = dataset.x_test, dataset.y_test, dataset.test_labels
    else:
        if unit not in dataset.units:
            raise KeyError(f"no unit {unit!r} in {dataset.name}")
        data = dataset.units[unit]
        x, y, labels = data.x_test, data.y_test, data.test_labels
    if dataset.task != "regression":
        report = evaluate(spec, params, x, y)
        if dataset.is_binary:
            report.update(_rare_event_report(dataset, spec, params, x, y, unit))
        return report
    if labels is None:
        return evaluate(spec, params, x, y, target_scale=dataset.scaler.target_std)
    normal = labels == 0
    report = evaluate(spec, params, x[normal], y[normal], target_scale=dataset.scaler.target_std)
    if 0 < int(labels.sum()) < labels.size:
        scored = evaluate(spec, params, x, y, anomaly_labels=labels)
        report["roc_auc"] = scored["roc_auc"]
    return report


def _positive_scores(spec: ModelSpec, params: Sequence[np.ndarray], x: np.ndarray) -> np.ndarray:
    logits = forward(spec, params, x)
    return np.asarray(logits[:, 1] - logits[:, 0], np.float64)  # monotone in P(class 1)


def _rare_event_report(dataset: FederatedDataset, spec: ModelSpec, params: Sequence[np.ndarray],
                       x: np.ndarray, y: np.ndarray, unit: str | None) -> dict[str, float]:
    """Positive-class F1/precision/recall, PR AUC and positive rate of a binary task.

    The decision threshold is tuned for F1 on the TRAINING rows (of the unit, or pooled),
    never on the test rows scored here: a threshold fitted to the test rows would make the
    reported F1 a best case no deployed model reaches."""
    units = [dataset.units[unit]] if unit is not None else list(dataset.units.values())
    x_train = np.concatenate([u.x_train for u in units])
    y_train = np.concatenate([u.y_train for u in units])
    threshold = metrics.f1_threshold(y_train, _positive_scores(spec, params, x_train))
    return metrics.binary_report(np.asarray(y), _positive_scores(spec, params, x), threshold)
