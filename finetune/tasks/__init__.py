"""Downstream tasks: one class per task, one module per class, all registered here.

`finetune.tasks.base.Task` says what a task owns (recipe checks, labels, features, head, loss, metrics,
evaluation files, inputs and answers). Adding a task means writing its module and registering an
instance with `register_task` (here for the shipped ones, or from code that extends finetune).
"""

from __future__ import annotations

from finetune.tasks.base import (
    IGNORE_INDEX, Encoded, FeatureContext, InputError, LabelEncoding, PostprocessOptions, Reference, Task,
    TaskSettings, sigmoid, softmax,
)
from finetune.tasks.classification import CLASSIFICATION
from finetune.tasks.masked_lm import MASKED_LM
from finetune.tasks.multi_label import MULTI_LABEL
from finetune.tasks.multiple_choice import MULTIPLE_CHOICE
from finetune.tasks.question_answering import QUESTION_ANSWERING
from finetune.tasks.registry import TASKS, get_task, register_task
from finetune.tasks.regression import REGRESSION
from finetune.tasks.token_classification import TOKEN_CLASSIFICATION

__all__ = ["TASKS", "get_task", "register_task", "IGNORE_INDEX", "Encoded", "FeatureContext", "InputError",
           "LabelEncoding", "PostprocessOptions", "Reference", "Task", "TaskSettings", "sigmoid", "softmax"]

for _task in (CLASSIFICATION, REGRESSION, MULTI_LABEL, TOKEN_CLASSIFICATION, QUESTION_ANSWERING, MULTIPLE_CHOICE,
              MASKED_LM):
    register_task(_task)
