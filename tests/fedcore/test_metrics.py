"""Metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from fedcore.learning import metrics


def test_classification_metrics_by_hand():
    truth = np.array([0, 0, 0, 1, 1, 2])
    pred = np.array([0, 0, 1, 1, 2, 2])
    assert metrics.accuracy(truth, pred) == pytest.approx(4 / 6)
    # per class precision: 2/2, 1/2, 1/2; recall: 2/3, 1/2, 1/1
    assert metrics.precision(truth, pred) == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert metrics.recall(truth, pred) == pytest.approx((2 / 3 + 0.5 + 1) / 3)
    f1s = [2 * 2 / (2 + 3), 2 * 1 / (2 + 2), 2 * 1 / (2 + 1)]
    assert metrics.f1(truth, pred) == pytest.approx(np.mean(f1s))


def test_never_predicted_class_counts_as_zero_precision():
    truth = np.array([0, 1, 1])
    pred = np.array([1, 1, 1])
    assert metrics.precision(truth, pred) == pytest.approx((0 + 2 / 3) / 2)
    assert metrics.recall(truth, pred) == pytest.approx((0 + 1) / 2)


def test_roc_auc_by_pair_counting_with_ties():
    labels = np.array([0, 0, 1, 1, 0, 1, 0])
    scores = np.array([0.1, 0.4, 0.35, 0.8, 0.4, 0.4, 0.0])
    pos = scores[labels == 1]
    neg = scores[labels == 0]
    pairs = [(p > n) + 0.5 * (p == n) for p in pos for n in neg]
    assert metrics.roc_auc(labels, scores) == pytest.approx(np.mean(pairs))
    assert metrics.roc_auc([0, 1], [0.2, 0.9]) == 1.0
    assert metrics.roc_auc([0, 1], [0.9, 0.2]) == 0.0
    assert metrics.roc_auc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5
    assert np.isnan(metrics.roc_auc([1, 1], [0.2, 0.3]))
    with pytest.raises(ValueError, match="0 or 1"):
        metrics.roc_auc([0, 2], [0.1, 0.2])


def test_roc_auc_large_random_matches_pair_counting():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.standard_normal(300) + labels, 1)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    expected = np.mean((pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :]))
    assert metrics.roc_auc(labels, scores) == pytest.approx(expected)


def test_regression_metrics():
    truth = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([1.0, 3.0, 1.0, 4.0])
    assert metrics.mse(truth, pred) == pytest.approx(5 / 4)
    assert metrics.rmse(truth, pred) == pytest.approx(np.sqrt(5 / 4))
    assert metrics.mae(truth, pred) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="predictions"):
        metrics.mse(truth, pred[:3])


def test_primary_metric():
    assert metrics.primary_metric("regression") == ("rmse", False)
    assert metrics.primary_metric("classification") == ("accuracy", True)
    assert metrics.primary_metric("anomaly") == ("roc_auc", True)
    with pytest.raises(ValueError, match="task"):
        metrics.primary_metric("ranking")
