"""Checks that run before any data is loaded or any MLflow run starts."""

from __future__ import annotations

from pathlib import Path

import torch

from finetune import checkpoints
from finetune.recipe import Recipe, RecipeError
from finetune.tasks import TaskDefinition, get_task


def choose_mixed_precision(requested: str) -> str:
    """Resolve `auto` and refuse half precision the hardware cannot run."""
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise RecipeError("training.mixed_precision: fp16 needs a CUDA GPU and none is visible; allowed here: auto, no, bf16")
    return requested


def preflight(recipe: Recipe) -> tuple[TaskDefinition, checkpoints.ResolvedCheckpoint]:
    """Everything checkable before loading data: task, checkpoint, model settings, a writable output folder."""
    task = get_task(recipe.task.type)
    resolved = checkpoints.resolve_checkpoint(recipe.model.checkpoint, recipe.model.revision, recipe.model.allow_pickle)
    config = checkpoints.load_config(resolved, recipe.model.trust_remote_code)
    problems = checkpoints.check_model_settings(config, recipe.model)
    if problems:
        raise RecipeError("the recipe does not fit the checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    choose_mixed_precision(recipe.training.mixed_precision)
    out = Path(recipe.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"output_dir: cannot write to {out.resolve()}: {e.strerror}") from None
    return task, resolved
