"""The training loop: one recipe in, one fine-tuned model (and one MLflow run) out.

Read it top to bottom: `main` sets up the Accelerator, then `setup_data`, `setup_model`, and
alternates `train_one_epoch` and `evaluate`, calling `save_checkpoint` whenever the evaluation
metric improves. It runs unchanged on CPU, one GPU, or several processes under `accelerate launch`.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from finetune import checkpoints
from finetune.bigbird import attention_for_batch
from finetune.data import PreparedData, prepare
from finetune.metrics import is_improvement
from finetune.modeling import ModelInfo, Predictor, build_model, load_tokenizer, make_collator, save_model_dir
from finetune.recipe import Recipe, RecipeError, recipe_to_yaml
from finetune.tasks import TaskDefinition, get_task
from finetune.tracking import NullTracker, Tracker

log = logging.getLogger(__name__)

SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


@dataclass
class RunState:
    """Where training is: counters, the best score so far, and whether to stop."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    samples: int = 0  # training examples seen, all processes
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    stop: bool = False
    attention_counts: dict[str, int] = field(default_factory=dict)


@dataclass
class RunResult:
    """What a finished run reports back."""

    best_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_dir: Path
    run_id: str | None
    model_uri: str | None
    steps: int
    train_seconds: float
    attention_batches: dict[str, int] = field(default_factory=dict)
    """BigBird: how many training batches ran with each attention type."""


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def setup_data(recipe: Recipe, task: TaskDefinition, tokenizer: Any, accelerator: Accelerator) -> PreparedData:
    """Load, label, split and tokenise once (on the main process first, so others read its cache)."""
    with accelerator.main_process_first():
        return prepare(recipe, task, tokenizer)


def setup_model(recipe: Recipe, task: TaskDefinition, resolved: checkpoints.ResolvedCheckpoint, label_names: list[str] | None):
    """The pretrained encoder with a fresh head for the task."""
    model, _ = build_model(resolved, recipe.model, task, label_names)
    return model


def train_one_epoch(
    model, loader, optimizer, scheduler, accelerator: Accelerator, recipe: Recipe, state: RunState,
    total_steps: int, progress, tracker, on_step_end,
) -> None:
    """One pass over the training data (or until max_steps), logging loss, learning rate and throughput."""
    model.train()
    cfg = recipe.training
    unwrapped = accelerator.unwrap_model(model)
    running_loss = torch.zeros((), device=accelerator.device)
    loss_count, window_start, window_samples = 0, time.perf_counter(), 0
    for batch in loader:
        with accelerator.accumulate(model):
            with attention_for_batch(unwrapped, batch["input_ids"], state.attention_counts):
                loss = model(**batch).loss
            accelerator.backward(loss)
            if accelerator.sync_gradients and cfg.max_grad_norm:
                accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        # Summed on the device and read only every logging_steps, so no step waits on the host.
        running_loss += loss.detach()
        loss_count += 1
        batch_samples = batch["input_ids"].shape[0] * accelerator.num_processes
        state.samples += batch_samples
        window_samples += batch_samples
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        progress.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            mean_loss = accelerator.reduce(running_loss / loss_count, reduction="mean").item()
            elapsed = time.perf_counter() - window_start
            throughput = window_samples / elapsed if elapsed > 0 else 0.0
            lr = scheduler.get_last_lr()[0]
            tracker.log_metrics(
                {"train/loss": mean_loss, "train/learning_rate": lr, "train/samples_per_second": throughput},
                step=state.step,
            )
            progress.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.1f}")
            running_loss.zero_()
            loss_count, window_start, window_samples = 0, time.perf_counter(), 0
        on_step_end()
        if state.stop or state.step >= total_steps:
            return


@torch.no_grad()
def evaluate(model, loader, accelerator: Accelerator, task: TaskDefinition, recipe: Recipe) -> tuple[dict[str, float], np.ndarray]:
    """Metrics of the task on a split, gathered across processes (without the padding duplicates)."""
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    all_logits, all_labels, losses = [], [], []
    for batch in loader:
        with attention_for_batch(unwrapped, batch["input_ids"]):
            outputs = model(**batch)
        logits, labels = accelerator.gather_for_metrics((outputs.logits, batch["labels"]))
        losses.append(accelerator.gather_for_metrics(outputs.loss.detach().repeat(batch["labels"].shape[0])))
        all_logits.append(logits.float().cpu().numpy())
        all_labels.append(labels.cpu().numpy())
    logits = np.concatenate(all_logits)
    metrics = task.compute_metrics(logits, np.concatenate(all_labels), recipe.task.threshold)
    metrics["loss"] = float(torch.cat(losses).float().mean().item())
    model.train()
    return metrics, logits


def save_checkpoint(accelerator: Accelerator, model, tokenizer, recipe: Recipe, info: ModelInfo, target: Path) -> None:
    """Write the best model (safetensors, tokenizer, label maps, task info, resolved recipe) atomically."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_model_dir(target, accelerator.unwrap_model(model), tokenizer, info, recipe_to_yaml(recipe))
    accelerator.wait_for_everyone()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


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


def make_optimizer(model: torch.nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases or LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": recipe.training.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=recipe.training.learning_rate, foreach=True)


def make_loaders(data: PreparedData, collator, recipe: Recipe) -> tuple[DataLoader, DataLoader]:
    cfg = recipe.training
    generator = torch.Generator().manual_seed(cfg.seed)
    common = {"collate_fn": collator, "num_workers": cfg.num_workers, "pin_memory": torch.cuda.is_available()}
    train = DataLoader(data.train, batch_size=cfg.batch_size, shuffle=True, generator=generator, **common)
    evaluation = DataLoader(data.eval, batch_size=cfg.eval_batch_size, shuffle=False, **common)
    return train, evaluation


def eval_loader(dataset, collator, recipe: Recipe) -> DataLoader:
    return DataLoader(dataset, batch_size=recipe.training.eval_batch_size, shuffle=False, collate_fn=collator)


def preflight(recipe: Recipe) -> tuple[TaskDefinition, checkpoints.ResolvedCheckpoint]:
    """Everything that can be checked before loading data: task, checkpoint, model settings, output folder."""
    task = get_task(recipe.task.type)
    resolved = checkpoints.resolve_checkpoint(recipe.model.checkpoint, recipe.model.revision, recipe.model.allow_pickle)
    config = checkpoints.load_config(resolved, recipe.model.trust_remote_code)
    problems = checkpoints.check_model_settings(config, recipe.model)
    if problems:
        raise RecipeError("the recipe does not fit the checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    out = Path(recipe.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"output_dir: cannot write to {out.resolve()}: {e.strerror}") from None
    return task, resolved


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(recipe: Recipe) -> RunResult:
    """Fine-tune as the recipe says; log to MLflow; return the best metrics and where the model is."""
    cfg = recipe.training
    task, resolved = preflight(recipe)
    accelerator = Accelerator(
        mixed_precision=choose_mixed_precision(cfg.mixed_precision),
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
    )
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(resolved.path, recipe.model.trust_remote_code)
    data = setup_data(recipe, task, tokenizer, accelerator)
    model = setup_model(recipe, task, resolved, data.label_names)
    collator = make_collator(tokenizer, model.config)
    train_dl, eval_dl = make_loaders(data, collator, recipe)
    optimizer = make_optimizer(model, recipe)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)

    updates_per_epoch = max(1, math.ceil(len(train_dl) / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * updates_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else math.ceil(cfg.warmup_ratio * total_steps)
    # The prepared scheduler steps once per process per optimizer step, so it counts in those units.
    scheduler = accelerator.prepare(
        get_scheduler(
            SCHEDULERS[cfg.scheduler], optimizer,
            num_warmup_steps=warmup * accelerator.num_processes,
            num_training_steps=total_steps * accelerator.num_processes,
        )
    )

    info = ModelInfo(
        task=task.name, label_names=data.label_names, text_pair=recipe.data.text_pair_column is not None,
        max_length=recipe.model.max_length, threshold=recipe.task.threshold,
        checkpoint=recipe.model.checkpoint, recipe_name=recipe.name,
    )
    best_dir = Path(recipe.output_dir) / "best"
    metric = recipe.task.metric_for_best
    greater = task.greater_is_better(metric)
    tracker = Tracker(recipe, {"finetune.checkpoint_source": resolved.source}) if accelerator.is_main_process else NullTracker()
    state = RunState()
    if accelerator.is_main_process:
        print(f"training {total_steps} steps ({updates_per_epoch}/epoch) on {len(data.train)} examples, "
              f"evaluating on {len(data.eval)}; tokenised data {'from cache' if data.cache_hit else 'built'}")

    def run_evaluation() -> None:
        metrics, _ = evaluate(model, eval_dl, accelerator, task, recipe)
        state.last_eval_step = state.step
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        if is_improvement(metrics[metric], state.best_metric, greater):
            state.best_metric, state.best_step, state.best_metrics = metrics[metric], state.step, metrics
            state.evals_without_improvement = 0
            info.metrics = metrics
            save_checkpoint(accelerator, model, tokenizer, recipe, info, best_dir)
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                state.stop = True
        if accelerator.is_main_process:
            tqdm.write(f"step {state.step}: eval {metric} {metrics[metric]:.4f} (best {state.best_metric:.4f} at step {state.best_step})")

    def on_step_end() -> None:
        if cfg.eval_strategy == "steps" and state.step % cfg.eval_steps == 0:
            run_evaluation()

    status = "FAILED"
    started = time.perf_counter()
    try:
        progress = tqdm(total=total_steps, disable=not accelerator.is_local_main_process, desc="training")
        while state.step < total_steps and not state.stop:
            train_one_epoch(model, train_dl, optimizer, scheduler, accelerator, recipe, state, total_steps,
                            progress, tracker, on_step_end)
            state.epoch += 1
            if cfg.eval_strategy == "epoch" and state.last_eval_step != state.step:
                run_evaluation()
        if state.last_eval_step != state.step:
            run_evaluation()
        progress.close()
        train_seconds = time.perf_counter() - started
        tracker.log_metrics(
            {f"best/{k}": v for k, v in state.best_metrics.items()}
            | {"train/runtime_seconds": train_seconds, "train/samples_per_second_overall": state.samples / train_seconds},
            step=state.step,
        )
        tracker.set_tags({"finetune.best_step": state.best_step, "finetune.attention_batches": state.attention_counts or "n/a"})
        test_metrics = evaluate_test(data, collator, recipe, task, accelerator, best_dir, tracker, state.step)
        model_uri = tracker.log_best_model(best_dir) if recipe.tracking.log_model else None
        status = "FINISHED"
    finally:
        tracker.end(status)
    if accelerator.is_main_process:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in state.best_metrics.items())
        print(f"best eval ({metric}) at step {state.best_step}: {shown}")
        if test_metrics:
            print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
        print(f"model: {best_dir}")
        print(f"MLflow: {tracker.url_hint}")
    return RunResult(state.best_metrics, test_metrics, best_dir, tracker.run_id, model_uri, state.step, train_seconds,
                     state.attention_counts)


def evaluate_test(data: PreparedData, collator, recipe: Recipe, task: TaskDefinition, accelerator: Accelerator,
                  best_dir: Path, tracker, step: int) -> dict[str, float]:
    """Score the best model once on the test split, if the recipe names one."""
    if data.test is None:
        return {}
    best = Predictor.from_dir(best_dir).model
    best, loader = accelerator.prepare(best, eval_loader(data.test, collator, recipe))
    metrics, _ = evaluate(best, loader, accelerator, task, recipe)
    tracker.log_metrics({f"test/{k}": v for k, v in metrics.items()}, step=step)
    return metrics
