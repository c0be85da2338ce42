"""Temperature scaling (Guo et al. 2017) and how calibrated scores are: expected calibration error, reliability bins.

One temperature T divides every logit before the softmax (classification) or sigmoid (multi-label); it is fitted
by minimising the negative log-likelihood on the evaluation split, so it changes how sure the scores are, never
which label is first. For multi-label, a threshold t other than 0.5 is moved with the scores (`served_threshold`),
so the same labels pass it: calibration changes scores, never decisions.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit, log_expit, logit, logsumexp

BINS = 15
"""Equal-width confidence bins of the expected calibration error (Guo et al.'s number)."""
LOG_T_RANGE = (-4.0, 4.0)
"""The fitted temperature stays within e^-4 .. e^4 (0.018 .. 55)."""


def nll(logits: np.ndarray, labels: np.ndarray, multi_label: bool, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the gold labels under softmax (or per-label sigmoid) of logits / T."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if multi_label:
        y = np.asarray(labels, dtype=np.float64)
        return float(-(y * log_expit(z) + (1 - y) * log_expit(-z)).mean())
    y = np.asarray(labels, dtype=np.int64)
    return float((logsumexp(z, axis=-1) - z[np.arange(len(y)), y]).mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray, multi_label: bool) -> float:
    """The temperature that minimises the negative log-likelihood of `labels` (a bounded 1-D search on log T)."""
    found = minimize_scalar(lambda log_t: nll(logits, labels, multi_label, float(np.exp(log_t))),
                            bounds=LOG_T_RANGE, method="bounded", options={"xatol": 1e-5})
    return float(np.exp(found.x))


def served_threshold(threshold: float, temperature: float) -> float:
    """The cut on sigmoid(z / T) that passes exactly the labels sigmoid(z) >= threshold passed.

    sigmoid(z) >= t holds when z >= logit(t), i.e. when z / T >= logit(t) / T: the same labels, at
    sigmoid(logit(t) / T). Without it, a threshold of 0.3 fitted on raw scores would, once T moved the scores
    across it, serve other labels than the ones evaluation scored (GoEmotions with focal loss: macro-F1 0.070
    evaluated, 0.032 served).
    """
    return float(expit(logit(threshold) / temperature))


def confidences(logits: np.ndarray, labels: np.ndarray, multi_label: bool,
                temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(score, whether it was right) pairs: the top softmax score and whether the top label is gold; for
    multi-label every label's sigmoid score and whether the label is gold."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    if multi_label:
        return expit(z).ravel(), np.asarray(labels, dtype=np.float64).ravel()
    shifted = np.exp(z - z.max(axis=-1, keepdims=True))
    p = shifted / shifted.sum(axis=-1, keepdims=True)
    return p.max(axis=-1), (p.argmax(axis=-1) == np.asarray(labels)).astype(np.float64)


def reliability_bins(scores: np.ndarray, right: np.ndarray, bins: int = BINS) -> list[dict[str, float]]:
    """Per equal-width score bin: its range, how many scores fall in it, their mean and how often they were right."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1], right=True), 0, bins - 1)
    out = []
    for b in range(bins):
        mine = which == b
        n = int(mine.sum())
        out.append({"low": float(edges[b]), "high": float(edges[b + 1]), "count": n,
                    "confidence": float(scores[mine].mean()) if n else 0.0,
                    "accuracy": float(right[mine].mean()) if n else 0.0})
    return out


def expected_calibration_error(scores: np.ndarray, right: np.ndarray, bins: int = BINS) -> float:
    """Sum over bins of (share of scores in the bin) x |how often right - mean score|."""
    total = max(len(scores), 1)
    return float(sum(b["count"] / total * abs(b["accuracy"] - b["confidence"]) for b in reliability_bins(scores, right, bins)))


@dataclass
class CalibrationReport:
    """What a fitted temperature did on the split it was fitted on (kept in finetune.json, shown in the card)."""

    temperature: float
    examples: int
    ece_before: float
    ece_after: float
    nll_before: float
    nll_after: float
    fitted: bool = True
    """False when the recipe fixed task.temperature (measured, not fitted)."""
    threshold: float | None = None
    """Multi-label: the threshold on the scores evaluation saw (before T)."""
    served_threshold: float | None = None
    """Multi-label: the same cut on calibrated scores (`served_threshold`), which the model is saved with."""
    test_examples: int | None = None
    """How many held-out (test split) examples `test_ece_before` and `test_ece_after` were measured on."""
    test_ece_before: float | None = None
    test_ece_after: float | None = None
    """ECE on the test split, which T was not fitted on: what to expect of served scores on new data."""
    bins_before: list[dict[str, float]] | None = None
    bins_after: list[dict[str, float]] | None = None

    def saved(self) -> dict:
        """The report without its bins, for finetune.json."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("bins")}


def calibrate(logits: np.ndarray, labels: np.ndarray, multi_label: bool, fixed: float | None = None,
              threshold: float = 0.5) -> CalibrationReport:
    """Fit (or, with `fixed`, only measure) a temperature on logits and gold labels.

    Multi-label: `threshold` is the cut evaluation applied to sigmoid(logits); a fitted T moves it to
    `served_threshold`. A fixed T already applied during evaluation, so its threshold stays as it is.
    """
    temperature = float(f"{fixed if fixed is not None else fit_temperature(logits, labels, multi_label):.6g}")
    moved = served_threshold(threshold, temperature) if multi_label and fixed is None else threshold
    before = confidences(logits, labels, multi_label)
    after = confidences(logits, labels, multi_label, temperature)
    return CalibrationReport(
        temperature=temperature, examples=int(len(labels)),
        ece_before=expected_calibration_error(*before), ece_after=expected_calibration_error(*after),
        nll_before=nll(logits, labels, multi_label), nll_after=nll(logits, labels, multi_label, temperature),
        fitted=fixed is None, threshold=threshold if multi_label else None,
        served_threshold=moved if multi_label else None, bins_before=reliability_bins(*before), bins_after=reliability_bins(*after))


def measure_held_out(report: CalibrationReport, logits: np.ndarray, labels: np.ndarray,
                     multi_label: bool) -> CalibrationReport:
    """The report with the expected calibration error before and after its temperature on examples it was not
    fitted on (the test split): the fitted split's ECE after is optimistic, this one is not."""
    before = confidences(logits, labels, multi_label)
    after = confidences(logits, labels, multi_label, report.temperature)
    return replace(report, test_examples=int(len(labels)), test_ece_before=expected_calibration_error(*before),
                   test_ece_after=expected_calibration_error(*after))
