"""Task definitions: the one place that says how each downstream task works.

A task says how text becomes model inputs, which head and loss the model uses (through the
Hugging Face `problem_type`), how gold labels are stored, which metrics apply, and how logits
become predictions. Training, evaluation, the MLflow model and the HTTP server all go through
these objects, so they cannot drift apart.
"""

from __future__ import annotations

from typing import Any

from finetune import metrics as M
from finetune.task_base import (
    IGNORE_INDEX, Encoded, FeatureContext, InputError, PostprocessOptions, Reference, TaskDefinition, TaskSettings,
    batch_texts, sigmoid, softmax,
)
from finetune.task_choice import MULTIPLE_CHOICE
from finetune.task_ner import TOKEN_CLASSIFICATION
from finetune.task_qa import QUESTION_ANSWERING

__all__ = ["TASKS", "get_task", "IGNORE_INDEX", "Encoded", "FeatureContext", "InputError", "PostprocessOptions",
           "Reference", "TaskDefinition", "TaskSettings", "batch_texts", "sigmoid", "softmax"]

TASKS: dict[str, Any] = {
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
TASKS.update({t.name: t for t in (TOKEN_CLASSIFICATION, QUESTION_ANSWERING, MULTIPLE_CHOICE)})


def get_task(name: str) -> TaskDefinition:
    """Look a task up by name, with a message that lists the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None
