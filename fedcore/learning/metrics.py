"""Evaluation metrics as plain functions on numpy arrays.

Classification: accuracy, and macro-averaged precision, recall and F1 (each class counts the
same, so a gateway whose data is dominated by one class cannot hide a useless model behind a
high accuracy). A class that is never predicted has precision 0; a class absent from both
truth and predictions is left out of the macro average.

ROC AUC (binary) is computed from ranks, the Mann-Whitney U statistic: the probability that
a random positive scores above a random negative, ties counted one half (tied scores get
their average rank). It is undefined when only one class is present; then it is NaN.

Rare events (binary, few positives): F1, precision and recall of the positive class at a
decision threshold, and PR AUC (average precision, threshold-free) of the positive-class
scores. Accuracy says little here: always answering "no event" scores one minus the positive
rate. The threshold comes from :func:`f1_threshold` on *training* rows only (the caller's
duty); tuning it on test rows would report a score no deployed model could reach.

Regression: MSE, RMSE, MAE on whatever scale the caller passes (the data sets report kW on
the original scale by inverting the target scaler first).
"""

from __future__ import annotations

import numpy as np

TASK_PRIMARY_METRIC: dict[str, tuple[str, bool]] = {
    "regression": ("rmse", False),
    "classification": ("accuracy", True),
    "anomaly": ("roc_auc", True),
}


def primary_metric(task: str) -> tuple[str, bool]:
    """The metric that ranks models for ``task`` and whether higher is better."""
    try:
        return TASK_PRIMARY_METRIC[task]
    except KeyError:
        raise ValueError(f"task {task!r} is not one of {', '.join(TASK_PRIMARY_METRIC)}") from None


# A binary target whose positive class is rarer than this (in training rows) is a rare-event
# task: its headline is the positive class's F1, not accuracy.
RARE_POSITIVE_RATE = 0.20

# Metrics where lower is better; every other reported metric is higher-is-better.
LOWER_IS_BETTER = frozenset({"loss", "mse", "rmse", "mae"})


def headline_metric(task: str, num_classes: int = 0, train_positive_rate: float | None = None
                    ) -> tuple[str, bool]:
    """The headline metric for a task: ``f1_pos`` for a binary classification whose
    positive class (label 1) is rare in the training rows, else :func:`primary_metric`."""
    if (task == "classification" and num_classes == 2 and train_positive_rate is not None
            and train_positive_rate < RARE_POSITIVE_RATE):
        return "f1_pos", True
    return primary_metric(task)


def holdout_metric(kind: str, task: str) -> tuple[str, bool]:
    """The metric a gateway's holdout evaluation is judged on, and whether higher is better.

    A plant has no anomaly labels, so an autoencoder is judged by its reconstruction
    error; regression by RMSE, classification by accuracy (what ``evaluate`` reports)."""
    if kind == "autoencoder":
        return "mse", False
    return ("accuracy", True) if task == "classification" else ("rmse", False)


def _pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(y_true).reshape(-1)
    p = np.asarray(y_pred).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"{t.shape[0]} true values but {p.shape[0]} predictions")
    if t.size == 0:
        raise ValueError("no samples to score")
    return t, p


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(t == p))


def _per_class_counts(
    y_true: np.ndarray, y_pred: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t, p = _pair(y_true, y_pred)
    classes = np.union1d(t, p)
    # One vectorised pass: a (n, k) comparison is small for the class counts seen here.
    is_true = t[:, None] == classes[None, :]
    is_pred = p[:, None] == classes[None, :]
    tp = np.sum(is_true & is_pred, axis=0)
    return tp, is_pred.sum(axis=0), is_true.sum(axis=0)


def _safe_ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    return np.divide(num, den, out=np.zeros(num.shape, dtype=np.float64), where=den > 0)


def precision(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged precision."""
    tp, predicted, _ = _per_class_counts(y_true, y_pred)
    return float(np.mean(_safe_ratio(tp, predicted)))


def recall(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged recall."""
    tp, _, actual = _per_class_counts(y_true, y_pred)
    return float(np.mean(_safe_ratio(tp, actual)))


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Macro-averaged F1 (the mean of per-class F1, not F1 of the mean P and R)."""
    tp, predicted, actual = _per_class_counts(y_true, y_pred)
    return float(np.mean(_safe_ratio(2 * tp, predicted + actual)))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    # Start of each run of equal values, and the mean rank of that run.
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Binary ROC AUC of ``scores`` (higher = more positive) for 0/1 ``labels``."""
    y, s = _pair(labels, scores)
    positive = y.astype(bool)
    if not np.isin(y, (0, 1)).all():
        raise ValueError("ROC AUC labels must be 0 or 1")
    if not np.all(np.isfinite(s)):
        raise ValueError("ROC AUC scores must be finite")
    n_pos = int(positive.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(s.astype(np.float64))
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def mse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.square(t.astype(np.float64) - p)))


def rmse(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.sqrt(mse(y_true, y_pred)))


def mae(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    t, p = _pair(y_true, y_pred)
    return float(np.mean(np.abs(t.astype(np.float64) - p)))


def classification_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Accuracy and macro precision, recall and F1, from one count of the classes."""
    tp, predicted, actual = _per_class_counts(y_true, y_pred)
    t, p = _pair(y_true, y_pred)
    return {
        "accuracy": float(np.mean(t == p)),
        "precision": float(np.mean(_safe_ratio(tp, predicted))),
        "recall": float(np.mean(_safe_ratio(tp, actual))),
        "f1": float(np.mean(_safe_ratio(2 * tp, predicted + actual))),
    }


def regression_report(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    m = mse(y_true, y_pred)
    return {"mse": m, "rmse": float(np.sqrt(m)), "mae": mae(y_true, y_pred)}


def _ranked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Rows by descending score (stable): the sorted scores, whether each row is positive,
    whether it ends a run of tied scores (only such a row is a reachable cut), and the
    number of positives."""
    y, s = _pair(labels, scores)
    order = np.argsort(-s.astype(np.float64), kind="mergesort")
    sorted_scores = s[order].astype(np.float64)
    last_of_run = np.r_[sorted_scores[1:] != sorted_scores[:-1], True]
    return sorted_scores, y[order] == 1, last_of_run, int(np.sum(y == 1))


def f1_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold (predict positive when ``score >= threshold``) that maximises
    the positive class's F1 on ``labels``. Call it with training rows only. Without a
    positive row it returns +inf (nothing is predicted positive)."""
    sorted_scores, hit, last_of_run, positives = _ranked(labels, scores)
    if positives == 0:
        return float("inf")
    tp = np.cumsum(hit)
    predicted = np.arange(1, hit.size + 1)
    f1_at = np.where(last_of_run, 2 * tp / (predicted + positives), -1.0)
    return float(sorted_scores[int(np.argmax(f1_at))])


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """PR AUC as average precision: the mean, over positives, of the precision at the cut
    that first includes each one (ties cut together). NaN without a positive."""
    _, hit, last_of_run, positives = _ranked(labels, scores)
    if positives == 0:
        return float("nan")
    tp = np.cumsum(hit)
    # every row of a tie run takes the precision at the run's end
    run_end = np.flatnonzero(last_of_run)
    end_of = run_end[np.searchsorted(run_end, np.arange(hit.size))]
    precision_at = tp[end_of] / (end_of + 1)
    return float(np.sum(precision_at * hit) / positives)


def binary_report(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Positive-class F1, precision and recall at ``threshold`` (chosen on training rows),
    PR AUC of the scores and the positive rate of ``labels``."""
    y, s = _pair(labels, scores)
    truth = y == 1
    pred = s >= threshold
    tp = int(np.sum(truth & pred))
    n_pred, n_true = int(pred.sum()), int(truth.sum())
    return {
        "f1_pos": 2 * tp / (n_pred + n_true) if n_pred + n_true else 0.0,
        "precision_pos": tp / n_pred if n_pred else 0.0,
        "recall_pos": tp / n_true if n_true else 0.0,
        "pr_auc": average_precision(y, s),
        "positive_rate": n_true / y.size,
    }
