"""Evaluation metrics that work offline.

`evaluate.load` with a metric's name downloads a metric script from the Hugging Face hub at run time,
which fails on machines without internet (and makes results depend on a remote script), so
the metrics this project relies on are thin wrappers over scikit-learn and SciPy, with the
same names and definitions as the `evaluate` ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats
from sklearn import metrics as skm


@dataclass(frozen=True)
class Metric:
    """A named metric: how to compute it and which direction is better."""

    name: str
    compute: Callable[[np.ndarray, np.ndarray], float]
    greater_is_better: bool = True


def _f1_macro(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(skm.f1_score(y_true, y_pred, average="macro", zero_division=0))


def _pearson(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if np.std(y_true) == 0 or np.std(y_pred) == 0:
        return 0.0  # undefined correlation: report "no signal" rather than NaN
    return float(stats.pearsonr(y_true, y_pred).statistic)


def _spearman(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    if np.std(y_true) == 0 or np.std(y_pred) == 0:
        return 0.0
    return float(stats.spearmanr(y_true, y_pred).statistic)


# Classification metrics take integer class ids; multi-label ones take 0/1 indicator matrices;
# regression ones take floats.
CLASSIFICATION = {
    m.name: m
    for m in [
        Metric("accuracy", lambda t, p: float(skm.accuracy_score(t, p))),
        Metric("f1_macro", _f1_macro),
        Metric("f1_weighted", lambda t, p: float(skm.f1_score(t, p, average="weighted", zero_division=0))),
        Metric("precision_macro", lambda t, p: float(skm.precision_score(t, p, average="macro", zero_division=0))),
        Metric("recall_macro", lambda t, p: float(skm.recall_score(t, p, average="macro", zero_division=0))),
        Metric("matthews_correlation", lambda t, p: float(skm.matthews_corrcoef(t, p))),
    ]
}

MULTI_LABEL = {
    m.name: m
    for m in [
        Metric("f1_micro", lambda t, p: float(skm.f1_score(t, p, average="micro", zero_division=0))),
        Metric("f1_macro", _f1_macro),
        Metric("precision_micro", lambda t, p: float(skm.precision_score(t, p, average="micro", zero_division=0))),
        Metric("recall_micro", lambda t, p: float(skm.recall_score(t, p, average="micro", zero_division=0))),
        Metric("subset_accuracy", lambda t, p: float(skm.accuracy_score(t, p))),
        Metric("hamming_loss", lambda t, p: float(skm.hamming_loss(t, p)), greater_is_better=False),
    ]
}

REGRESSION = {
    m.name: m
    for m in [
        Metric("pearson", _pearson),
        Metric("spearman", _spearman),
        Metric("mse", lambda t, p: float(skm.mean_squared_error(t, p)), greater_is_better=False),
        Metric("mae", lambda t, p: float(skm.mean_absolute_error(t, p)), greater_is_better=False),
        Metric("r2", lambda t, p: float(skm.r2_score(t, p))),
    ]
}


def compute_all(metrics: dict[str, Metric], y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """Compute every metric of a family; returns plain floats keyed by metric name."""
    return {name: m.compute(y_true, y_pred) for name, m in metrics.items()}


def is_improvement(new: float, best: float | None, greater_is_better: bool) -> bool:
    """Whether `new` beats `best` (None means there is nothing to beat yet)."""
    if best is None:
        return True
    return new > best if greater_is_better else new < best
