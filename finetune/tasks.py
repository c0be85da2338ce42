"""Task definitions: the one place that says how each downstream task works.

A task says how text becomes model inputs, which head and loss the model uses (through the
Hugging Face `problem_type`), how gold labels are stored, which metrics apply, and how logits
become predictions. Training, evaluation, the MLflow model and the HTTP server all go through
these objects, so they cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from finetune import metrics as M


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


@dataclass(frozen=True)
class PostprocessOptions:
    """Per-request knobs for turning logits into answers."""

    threshold: float = 0.5
    """Multi-label: a label is predicted when its sigmoid score is at least this."""
    top_k: int | None = None
    """Classification: also return the k best labels with scores."""


@dataclass(frozen=True)
class TaskDefinition:
    """How one task preprocesses, trains, scores and answers."""

    name: str
    description: str
    problem_type: str
    """The Hugging Face `config.problem_type`; it selects the loss inside the model head."""
    metrics: dict[str, M.Metric] = field(repr=False)
    default_metric: str = ""
    has_label_names: bool = True
    """Regression predicts a number, so it has no label set."""

    # --- preprocessing -------------------------------------------------------------------
    def tokenize(self, tokenizer: Any, texts: Sequence[str], pairs: Sequence[str] | None, max_length: int) -> dict:
        """Tokenise texts (and second texts for pair tasks) without padding.

        Padding is left to the collator so batches pad only to their own longest example.
        """
        return tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=max_length,
        )

    def num_labels(self, label_names: Sequence[str] | None) -> int:
        return len(label_names) if self.has_label_names else 1

    # --- evaluation ----------------------------------------------------------------------
    def predictions(self, logits: np.ndarray, threshold: float = 0.5) -> np.ndarray:
        """Turn a batch of logits into what metrics compare against gold labels."""
        if self.problem_type == "single_label_classification":
            return logits.argmax(axis=-1)
        if self.problem_type == "multi_label_classification":
            return (sigmoid(logits) >= threshold).astype(np.int64)
        return logits.reshape(-1)

    def gold(self, labels: np.ndarray) -> np.ndarray:
        """Bring gold labels to the shape `predictions` returns."""
        if self.problem_type == "multi_label_classification":
            return labels.astype(np.int64)
        if self.problem_type == "regression":
            return labels.reshape(-1).astype(np.float64)
        return labels.astype(np.int64)

    def compute_metrics(self, logits: np.ndarray, labels: np.ndarray, threshold: float = 0.5) -> dict[str, float]:
        """Every metric of this task, from raw logits and gold labels."""
        return M.compute_all(self.metrics, self.gold(labels), self.predictions(logits, threshold))

    def greater_is_better(self, metric: str) -> bool:
        return self.metrics[metric].greater_is_better

    # --- answers -------------------------------------------------------------------------
    def postprocess(
        self, logits: np.ndarray, label_names: Sequence[str] | None, options: PostprocessOptions = PostprocessOptions()
    ) -> list[dict[str, Any]]:
        """Turn a batch of logits into one JSON-ready answer per input."""
        answers: list[dict[str, Any]] = []
        if self.problem_type == "single_label_classification":
            probs = softmax(logits.astype(np.float64))
            for row in probs:
                best = int(row.argmax())
                answer: dict[str, Any] = {
                    "label": label_names[best],
                    "score": float(row[best]),
                    "scores": {name: float(p) for name, p in zip(label_names, row)},
                }
                if options.top_k:
                    order = np.argsort(-row, kind="stable")[: options.top_k]
                    answer["top_k"] = [{"label": label_names[i], "score": float(row[i])} for i in order]
                answers.append(answer)
        elif self.problem_type == "multi_label_classification":
            probs = sigmoid(logits.astype(np.float64))
            for row in probs:
                chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= options.threshold]
                answers.append(
                    {
                        "labels": [label_names[i] for i in chosen],
                        "label_scores": [float(row[i]) for i in chosen],
                        "scores": {name: float(p) for name, p in zip(label_names, row)},
                    }
                )
        else:
            answers = [{"value": float(v)} for v in logits.reshape(-1)]
        return answers


TASKS: dict[str, TaskDefinition] = {
    t.name: t
    for t in [
        TaskDefinition(
            name="classification",
            description="single-sentence or sentence-pair classification (softmax over the label set)",
            problem_type="single_label_classification",
            metrics=M.CLASSIFICATION,
            default_metric="accuracy",
        ),
        TaskDefinition(
            name="multi_label",
            description="multi-label classification (a sigmoid per label, labels over a threshold)",
            problem_type="multi_label_classification",
            metrics=M.MULTI_LABEL,
            default_metric="f1_micro",
        ),
        TaskDefinition(
            name="regression",
            description="single-sentence or sentence-pair regression (one real value)",
            problem_type="regression",
            metrics=M.REGRESSION,
            default_metric="pearson",
            has_label_names=False,
        ),
    ]
}


def get_task(name: str) -> TaskDefinition:
    """Look a task up by name, with a message that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
