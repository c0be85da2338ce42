"""Losses for imbalanced labels (class weights, focal loss) and the numbers they are built from.

Classification and multi-label read `task.class_weights`, `task.loss` and `task.focal_gamma` here, so the
loss of training and of evaluation is the same function of the same saved numbers. `balanced` becomes numbers
once, from the train split's counts, at training start (`balanced_weights`), and is saved with the model.

The focal loss is written out rather than taken from a library: torchvision's `sigmoid_focal_loss` covers
the binary case only and would add torchvision (which breaks beside the CPU torch wheel MLflow infers); the
formula is two lines on top of PyTorch's own weighted cross-entropies.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from finetune.errors import RecipeError
from finetune.tasks.base import class_weights_length
from finetune.tasks.settings import TaskSettings

SKEW_RATIO = 3.0
"""`finetune validate` warns when the most frequent class has at least this many times the examples of the rarest
(multi-label: when a label has at least this many times more negatives than positives, times the label count)."""


def balanced_weights(counts: Sequence[int], total: int, multi_label: bool) -> list[float]:
    """`task.class_weights: balanced` as numbers.

    Classification: total / (classes x count), scikit-learn's `balanced` (a class as frequent as the average gets
    1). Multi-label: negatives / positives per label, PyTorch's suggestion for `pos_weight` (a label's positives
    then weigh as much as its negatives). A label with no example counts as one, so no weight is infinite.
    """
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    weights = (total - counts) / counts if multi_label else total / (len(counts) * counts)
    return [float(f"{w:.6g}") for w in np.maximum(weights, 1e-6)]


def weights_by_label(weights: Any, label_names: Sequence[str] | None) -> dict[str, float] | None:
    """Resolved `task.class_weights` per label name, as the run records them (an MLflow param), or None when the
    task uses none. `balanced` must already be numbers (`WeightedLosses.settings_for_training`)."""
    if weights is None or isinstance(weights, str) or not label_names:
        return None
    return {str(name): float(w) for name, w in zip(label_names, weights)}


def cross_entropy(logits: Any, labels: Any, weights: Sequence[float] | None, focal_gamma: float | None) -> Any:
    """Single-label loss: (class-weighted) cross-entropy, optionally focal.

    With weights, the mean is over the weights of the examples' gold classes (as `F.cross_entropy` takes it),
    so focal with gamma 0 is exactly the weighted cross-entropy.
    """
    import torch
    import torch.nn.functional as F

    logits = logits.view(-1, logits.shape[-1]).float()
    labels = labels.view(-1)
    weight = None if weights is None else torch.as_tensor(weights, dtype=logits.dtype, device=logits.device)
    if focal_gamma is None:
        return F.cross_entropy(logits, labels, weight=weight)
    nll = F.cross_entropy(logits, labels, reduction="none")
    gold_probability = torch.exp(-nll)
    per_example = (1 - gold_probability) ** focal_gamma * nll
    if weight is None:
        return per_example.mean()
    w = weight[labels]
    return (w * per_example).sum() / w.sum()


def binary_cross_entropy(logits: Any, targets: Any, pos_weight: Sequence[float] | None, focal_gamma: float | None) -> Any:
    """Multi-label loss: binary cross-entropy per label (positives weighted by `pos_weight`), optionally focal."""
    import torch
    import torch.nn.functional as F

    logits = logits.float()
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    if focal_gamma is None:
        return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight)
    per_label = F.binary_cross_entropy_with_logits(logits, targets, pos_weight=weight, reduction="none")
    p = torch.sigmoid(logits)
    gold_probability = targets * p + (1 - targets) * (1 - p)
    return ((1 - gold_probability) ** focal_gamma * per_label).mean()


def skew_warning(counts: dict[str, int], total: int, multi_label: bool, knob_set: bool) -> str | None:
    """What `finetune validate` says about a skewed train split (None: not skewed, or a knob already set)."""
    if knob_set or not counts:
        return None
    if multi_label:
        worst = max(counts, key=lambda k: (total - counts[k]) / max(counts[k], 1))
        ratio = (total - counts[worst]) / max(counts[worst], 1)
        if ratio < SKEW_RATIO * len(counts):
            return None
        return (f"the train labels are skewed: {counts[worst]} of {total} examples carry {worst!r} "
                f"({ratio:.0f} negatives per positive); task.class_weights: balanced weighs each label's positives "
                f"up (pos_weight), task.loss: focal down-weights the easy negatives")
    rare, common = min(counts, key=counts.get), max(counts, key=counts.get)
    ratio = counts[common] / max(counts[rare], 1)
    if ratio < SKEW_RATIO:
        return None
    return (f"the train labels are skewed: {counts[common]} {common!r} against {counts[rare]} {rare!r} "
            f"({ratio:.1f}x); task.class_weights: balanced weighs the rare classes up, task.loss: focal down-weights "
            f"the examples the model already gets right")


class WeightedLosses:
    """`task.class_weights` and `task.loss: focal` for a task that scores every label: a mixin placed before the
    task's base class. With `sigmoid_scores` (a sigmoid per label: multi_label) the loss is binary cross-entropy and
    an example counts toward several labels, else cross-entropy over a softmax. The task provides
    `label_counts(split, label_names)`."""

    weighted_losses = True

    def loss(self, outputs: Any, targets: dict[str, Any], settings: TaskSettings) -> Any:
        weights = settings.class_weights
        if isinstance(weights, str):
            raise ValueError("task.class_weights must be resolved to numbers (settings_for_training) before the loss")
        gamma = settings.focal_gamma if settings.loss == "focal" else None
        loss = binary_cross_entropy if self.sigmoid_scores else cross_entropy
        return loss(outputs.logits, targets["labels"], weights, gamma)

    def settings_for_training(self, settings: TaskSettings, train: Any, label_names: Sequence[str] | None) -> TaskSettings:
        weights = settings.class_weights
        if weights == "balanced":
            counts = self.label_counts(train, label_names)
            weights = balanced_weights(list(counts.values()), len(train), multi_label=self.sigmoid_scores)
        elif isinstance(weights, list) and len(weights) != len(label_names):
            raise RecipeError(class_weights_length(weights, label_names))
        return settings.model_copy(update={"class_weights": weights})

    def skew_warning(self, train: Any, label_names: Sequence[str] | None, settings: TaskSettings) -> str | None:
        return skew_warning(self.label_counts(train, label_names), len(train), self.sigmoid_scores,
                            settings.class_weights is not None or settings.loss == "focal")
