"""Rare-event metrics: positive-class F1 headline, PR AUC, and a threshold from training rows."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.datasets import evaluate_dataset
from fedcore.datasets.base import RawUnit, assemble
from fedcore.learning import metrics
from fedcore.protocol.messages import ModelSpec


def test_pr_auc_by_hand_with_a_tie():
    y = np.array([0, 0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.4, 0.4])
    # positives at ranks 1, 2 and in the tie {0.4, 0.4} cut together at rank 4: 1, 1, 3/4
    assert metrics.average_precision(y, s) == pytest.approx((1 + 1 + 0.75) / 3)
    assert np.isnan(metrics.average_precision(np.zeros(3, int), np.arange(3.0)))


def test_f1_threshold_maximises_positive_f1():
    y = np.array([0, 0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.2, 0.9, 0.3, 0.8, 0.4, 0.4])
    assert metrics.f1_threshold(y, s) == 0.4  # 3 of 3 positives, 1 false: F1 6/7
    report = metrics.binary_report(y, s, 0.4)
    assert report["f1_pos"] == pytest.approx(6 / 7)
    assert report["precision_pos"] == pytest.approx(0.75) and report["recall_pos"] == 1.0
    assert report["positive_rate"] == pytest.approx(3 / 7)
    assert metrics.f1_threshold(np.zeros(4, int), np.arange(4.0)) == float("inf")


def test_headline_is_positive_f1_only_for_a_rare_binary_target():
    assert metrics.headline_metric("classification", 2, 0.03) == ("f1_pos", True)
    assert metrics.headline_metric("classification", 2, 0.5) == ("accuracy", True)
    assert metrics.headline_metric("classification", 4, 0.03) == ("accuracy", True)
    assert metrics.headline_metric("regression") == ("rmse", False)


def _identity_model() -> tuple[ModelSpec, list[np.ndarray]]:
    """A linear model whose positive score (logit 1 - logit 0) is the scaled input."""
    spec = ModelSpec(kind="mlp", layer_sizes=(1, 2), activation="relu", task="classification",
                     features=("x",), target="y")
    return spec, [np.array([[0.0, 1.0]], np.float32), np.zeros(2, np.float32)]


def test_threshold_is_chosen_on_training_rows_not_test_rows():
    x = np.arange(10, dtype=np.float64).reshape(-1, 1)
    t = np.arange(10, dtype=np.float64)
    y_train = (x[:, 0] >= 9).astype(np.int64)  # 1 positive of 10: the best cut is x >= 9
    y_test = (x[:, 0] >= 5).astype(np.int64)  # on test rows the best cut would be x >= 5
    ds = assemble("rare", "classification", ("x",), "y",
                  {"u": RawUnit(x, y_train, x, y_test, t, t, None)}, num_classes=2)
    assert ds.primary_metric == ("f1_pos", True)
    assert ds.train_positive_rate == pytest.approx(0.1)
    spec, params = _identity_model()
    report = evaluate_dataset(ds, spec, params)
    # cut at x >= 9: 1 true positive of 5, 1 predicted -> F1 2/6 (a cut tuned on these test
    # rows would give 1.0)
    assert report["f1_pos"] == pytest.approx(2 / 6)
    assert report["recall_pos"] == pytest.approx(1 / 5) and report["precision_pos"] == 1.0
    assert report["pr_auc"] == pytest.approx(1.0)  # threshold-free: the ranking is perfect
    assert report["positive_rate"] == pytest.approx(0.5)
    assert {"accuracy", "f1", "loss"} <= set(report)


def test_a_balanced_or_multiclass_task_keeps_accuracy():
    x = np.arange(10, dtype=np.float64).reshape(-1, 1)
    t = np.arange(10, dtype=np.float64)
    y = (x[:, 0] >= 5).astype(np.int64)
    ds = assemble("even", "classification", ("x",), "y",
                  {"u": RawUnit(x, y, x, y, t, t, None)}, num_classes=2)
    assert ds.primary_metric == ("accuracy", True)
