"""After training: score the best model, write what a person wants to look at, log and register the model."""

from __future__ import annotations

import resource
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator

from finetune.config.recipe import Recipe, recipe_to_yaml
from finetune.data.batching import eval_loader
from finetune.data.features import PreparedData
from finetune.models.predictor import Predictor
from finetune.reports import artifacts
from finetune.tasks import Reference, Task, TaskSettings
from finetune.tracking.registry import register_and_maybe_promote
from finetune.training.evaluation import evaluate


@dataclass
class FinalReport:
    test_metrics: dict[str, float]
    model_uri: str | None
    champion: dict[str, Any] | None
    tracking_problem: str | None = None


def peak_memory_mb() -> dict[str, float]:
    """Peak resident memory of this process so far (and peak CUDA memory allocated, on a GPU), in MiB.

    ru_maxrss is the high-water mark the kernel keeps, so it catches short peaks a sampling monitor
    (MLflow's system metrics) would miss; it is KiB on Linux and bytes on macOS.
    """
    import torch

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 * 1024 if sys.platform == "darwin" else 1024)
    peaks = {"train/peak_memory_mb": round(rss, 1)}
    if torch.cuda.is_available():
        peaks["train/peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return peaks


def _data_description(recipe: Recipe, task: Task, data: PreparedData) -> str:
    source = f"hub data set `{recipe.data.dataset}`" + (f" ({recipe.data.dataset_config})" if recipe.data.dataset_config else "")
    if recipe.data.files:
        source = "local files " + ", ".join(f"`{k}`: `{v}`" for k, v in recipe.data.files.items())
    columns = ", ".join(f"{key.removeprefix('data.')} `{column}`" for key, column in task.columns(recipe.data).items())
    return (f"{source}; {columns}; "
            f"{len(data.train)} training and {len(data.eval)} evaluation examples"
            + (f", {len(data.test)} test examples" if data.test is not None else ""))


def finish_run(recipe: Recipe, task: Task, data: PreparedData, collator, accelerator: Accelerator,
               tracker, state, extra: Any = None) -> FinalReport:
    """Log the best metrics, score the best model on eval (for artifacts) and test, log artifacts, model and champion."""
    settings = TaskSettings.of(recipe.task)
    batch_size = recipe.training.eval_batch_size
    best_dir = Path(recipe.output_dir) / "best"
    throughput = state.samples / state.train_seconds if state.train_seconds else 0.0
    tracker.log_metrics(
        {f"best/{k}": v for k, v in state.best_metrics.items()}
        | {"train/runtime_seconds": state.train_seconds, "train/samples_per_second_overall": throughput}
        | peak_memory_mb(),
        step=state.step,
    )
    tracker.set_tags({"finetune.best_step": state.best_step, "finetune.attention_batches": state.attention_counts or "n/a"})

    accelerator.wait_for_everyone()
    best = accelerator.prepare(Predictor.from_dir(best_dir).model)
    eval_reference = Reference(data.eval_features, data.raw_eval, recipe.data)
    _, eval_outputs = evaluate(best, accelerator.prepare(eval_loader(data.eval, collator, batch_size)), accelerator, task,
                               settings, eval_reference, data.label_names)
    test_metrics: dict[str, float] = {}
    if data.test is not None:
        test_metrics, _ = evaluate(best, accelerator.prepare(eval_loader(data.test, collator, batch_size)), accelerator, task,
                                   settings, Reference(data.test_features, data.raw_test, recipe.data), data.label_names,
                                   extra)
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=state.step)

    model_uri, champion, problem = None, None, None
    if accelerator.is_main_process:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            task.write_artifacts(out / "evaluation", eval_reference, eval_outputs, state.best_metrics,
                                 data.label_names, settings)
            artifacts.write_learning_curves(out, tracker.history(), recipe.task.metric_for_best)
            counts = {"train": task.label_counts(data.train, data.label_names),
                      "eval": task.label_counts(data.eval, data.label_names)}
            if data.test is not None:
                counts["test"] = task.label_counts(data.test, data.label_names)
            card = artifacts.write_model_card(
                out, recipe_yaml=recipe_to_yaml(recipe), recipe_name=recipe.name, checkpoint=recipe.model.checkpoint,
                task=task, label_names=data.label_names, label_counts=counts, metrics=state.best_metrics,
                test_metrics=test_metrics, data_description=_data_description(recipe, task, data),
                train_examples=len(data.raw_train),
            )
            (best_dir / card.name).write_text(card.read_text())
            tracker.log_artifacts(out)
        if recipe.tracking.log_model:
            model_uri = tracker.log_best_model(best_dir)
            if recipe.tracking.register_as and model_uri:
                champion = tracker.guarded(
                    "register the model", register_and_maybe_promote, model_uri, tracker.run_id, recipe.tracking.register_as, recipe.task.metric_for_best,
                    state.best_metric, task.greater_is_better(recipe.task.metric_for_best), task.name, data.label_names,
                )
        shown = ", ".join(f"{k} {v:.4f}" for k, v in state.best_metrics.items())
        print(f"best eval ({recipe.task.metric_for_best}) at step {state.best_step}: {shown}")
        if test_metrics:
            print("test: " + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
        if champion:
            print(f"registered {champion['name']} version {champion['version']}: {champion['decision']}")
        print(f"model: {best_dir}")
        print(f"MLflow: {tracker.url_hint}")
        problem = tracker.report_failures(recipe.output_dir)
        if problem:
            print(f"warning: {problem}", file=sys.stderr)
    accelerator.wait_for_everyone()
    return FinalReport(test_metrics, model_uri, champion, problem)
