"""Evaluating a model on a split during and after training: the task's metrics, gathered across processes."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from accelerate import Accelerator

from finetune.evaluation.extra_metrics import ExtraMetrics
from finetune.models.bigbird import attention_for_batch
from finetune.tasks import IGNORE_INDEX, Reference, Task, TaskSettings
from finetune.threads import process_budget


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, task: Task, settings: TaskSettings, reference: Reference,
             label_names: list[str] | None, extra: ExtraMetrics | None = None) -> tuple[dict[str, float], Any]:
    """Metrics of the task on a split (and its mean loss), gathered across processes without the padding duplicates,
    and the recipe's extra `evaluate` metrics (`task.extra_metrics`) when given.

    Returns the metrics and the task's evaluation outputs (logits, or per-example predictions for spans).
    """
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    collected: dict[str, list[np.ndarray]] = {}
    losses = []
    budget = process_budget()  # the run's (finetune.training.train sets it)
    for batch in loader:
        budget.apply()  # an evaluation can outlast the machine's load of when it began
        inputs, targets = task.split_batch(batch)
        with attention_for_batch(unwrapped, inputs["input_ids"]):
            outputs = task.forward(model, inputs, targets)
        loss = task.loss(outputs, targets, settings)
        for key, tensor in task.eval_tensors(outputs, batch).items():
            if tensor.dim() > 1 and task.per_token:  # token axes differ between processes' batches
                tensor = accelerator.pad_across_processes(tensor, dim=1, pad_index=IGNORE_INDEX)
            tensor = accelerator.gather_for_metrics(tensor)
            collected.setdefault(key, []).append((tensor.float() if tensor.is_floating_point() else tensor).cpu().numpy())
        losses.append(accelerator.gather_for_metrics(loss.detach().repeat(inputs["input_ids"].shape[0])))
    metrics, produced = task.evaluation(collected, reference, settings, label_names)
    if extra:
        metrics |= extra.compute(task, produced, reference, settings)
    metrics["loss"] = float(torch.cat(losses).float().mean().item())
    model.train()
    return metrics, produced
