"""After training: score the best model, write what a person wants to look at, log and register the model.

What the run ends with for a person (best metrics, the task's warnings, where the model and the MLflow run
are) is returned as a `RunEnd` for the run's report; nothing here prints.
"""

from __future__ import annotations

import resource
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from accelerate import Accelerator

from finetune.config.recipe import Recipe, recipe_to_yaml
from finetune.data.batching import eval_loader
from finetune.data.features import PreparedData
from finetune.models.modeling import read_model_info, write_model_info
from finetune.models.predictor import Predictor
from finetune.reports import artifacts
from finetune.tasks import Reference, Task, TaskSettings
from finetune.tasks.calibration import CalibrationReport, calibrate, measure_held_out
from finetune.tracking.registry import register_and_maybe_promote
from finetune.training.evaluation import evaluate
from finetune.training.report import RunEnd


@dataclass
class FinalReport:
    test_metrics: dict[str, float]
    model_uri: str | None
    champion: dict[str, Any] | None
    tracking_problem: str | None = None
    summary: RunEnd | None = None
    """What the run's report shows at the end (main process only)."""
    warnings: list[str] = field(default_factory=list)


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


def calibrate_best(task: Task, settings: TaskSettings, eval_logits: np.ndarray,
                   gold: np.ndarray) -> tuple[TaskSettings, CalibrationReport | None]:
    """Fit temperature scaling on the evaluation split's logits (`save_calibration` keeps it with the model).

    Returns the settings with the temperature (and, multi-label, the threshold moved with the scores: what the
    served model answers with) and the report; the settings are unchanged and the report None when the task's
    scores are not calibrated or the recipe says task.calibration: none (unless it fixes task.temperature, which
    is then only measured).
    """
    if not task.calibrates or (settings.calibration == "none" and settings.temperature is None) or not len(gold):
        return settings, None
    report = calibrate(eval_logits, gold, task.sigmoid_scores, fixed=settings.temperature, threshold=settings.threshold)
    update = {"temperature": report.temperature}
    if report.served_threshold is not None:
        update["threshold"] = report.served_threshold
    return settings.model_copy(update=update), report


def save_calibration(best_dir: Path, settings: TaskSettings, report: CalibrationReport) -> None:
    """Keep the fitted settings and the report (held-out figures included) in the best model's finetune.json."""
    info = read_model_info(best_dir)
    info.settings, info.calibration = settings.saved(), report.saved()
    write_model_info(best_dir, info)


def finish_run(recipe: Recipe, task: Task, data: PreparedData, collator, accelerator: Accelerator,
               tracker, state, settings: TaskSettings | None = None, card_lines: list[str] | None = None,
               extra: Any = None) -> FinalReport:
    """Log the best metrics, score the best model on eval (for artifacts) and test, calibrate its scores, log
    artifacts, model and champion.

    `settings` are the task settings training used (class weights resolved); `card_lines` say in the model card
    what the run started from and what it trained; `extra` are the recipe's extra evaluate metrics.
    """
    settings = settings or TaskSettings.of(recipe.task)
    batch_size = recipe.training.eval_batch_size
    best_dir = Path(recipe.output_dir) / "best"
    throughput = state.samples / state.train_seconds if state.train_seconds else 0.0
    peaks = peak_memory_mb()
    tracker.log_metrics(
        {f"best/{k}": v for k, v in state.best_metrics.items()}
        | {"train/runtime_seconds": state.train_seconds, "train/samples_per_second_overall": throughput}
        | peaks,
        step=state.step,
    )
    saved = sum(f.stat().st_size for f in best_dir.glob("*.safetensors"))
    tracker.log_metrics({"model/saved_weights_mb": round(saved / 2**20, 3)}, step=state.step)
    tracker.set_tags({"finetune.best_step": state.best_step, "finetune.attention_batches": state.attention_counts or "n/a"})

    accelerator.wait_for_everyone()
    best = accelerator.prepare(Predictor.from_dir(best_dir).model)
    eval_reference = Reference(data.eval_features, data.raw_eval, recipe.data)
    _, eval_outputs = evaluate(best, accelerator.prepare(eval_loader(data.eval, collator, batch_size)), accelerator, task,
                               settings, eval_reference, data.label_names)
    report = None
    if accelerator.is_main_process:
        settings, report = calibrate_best(task, settings, np.asarray(eval_outputs),
                                          np.asarray(data.raw_eval["labels"]) if task.calibrates else np.zeros(0))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        settings = TaskSettings.of(broadcast_object_list([settings.saved()])[0])
    if report is not None:
        tracker.log_metrics({"calibration/temperature": report.temperature, "calibration/ece_before": report.ece_before,
                             "calibration/ece_after": report.ece_after, "calibration/nll_before": report.nll_before,
                             "calibration/nll_after": report.nll_after}, step=state.step)
    warnings = task.evaluation_warnings(eval_reference, eval_outputs, data.label_names, settings)
    if warnings:
        tracker.set_tags({"finetune.warnings": "\n".join(warnings)})
    test_metrics: dict[str, float] = {}
    if data.test is not None:
        test_metrics, test_outputs = evaluate(best, accelerator.prepare(eval_loader(data.test, collator, batch_size)),
                                              accelerator, task, settings,
                                              Reference(data.test_features, data.raw_test, recipe.data),
                                              data.label_names, extra)
        tracker.log_metrics({f"test/{k}": v for k, v in test_metrics.items()}, step=state.step)
        if report is not None and accelerator.is_main_process:
            report = measure_held_out(report, np.asarray(test_outputs), np.asarray(data.raw_test["labels"]),
                                      task.sigmoid_scores)
            tracker.log_metrics({"calibration/test_ece_before": report.test_ece_before,
                                 "calibration/test_ece_after": report.test_ece_after}, step=state.step)

    if report is not None and accelerator.is_main_process:
        save_calibration(best_dir, settings, report)  # once, after the test split's figures are in

    model_uri, champion, problem, summary = None, None, None, None
    if accelerator.is_main_process:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp)
            task.write_artifacts(out / "evaluation", eval_reference, eval_outputs, state.best_metrics,
                                 data.label_names, settings)
            if report is not None:
                artifacts.write_reliability_diagram(out / "evaluation" / "reliability_diagram.png", report,
                                                    task.sigmoid_scores)
            artifacts.write_learning_curves(out, tracker.history(), recipe.task.metric_for_best)
            counts = {"train": task.label_counts(data.train, data.label_names),
                      "eval": task.label_counts(data.eval, data.label_names)}
            if data.test is not None:
                counts["test"] = task.label_counts(data.test, data.label_names)
            card = artifacts.write_model_card(
                out, recipe_yaml=recipe_to_yaml(recipe), recipe_name=recipe.name, checkpoint=recipe.model.checkpoint,
                task=task, label_names=data.label_names, label_counts=counts, metrics=state.best_metrics,
                test_metrics=test_metrics, data_description=_data_description(recipe, task, data),
                train_examples=len(data.raw_train), calibration=report.saved() if report else None,
                transfer=card_lines, teacher=recipe.distillation.teacher if recipe.distillation is not None else None,
            )
            (best_dir / card.name).write_text(card.read_text())
            tracker.log_artifacts(out)
        if recipe.tracking.log_model and not task.serves:
            # A checkpoint to fine-tune (masked_lm) is kept as plain files, not as a model MLflow would serve.
            import mlflow

            tracker.guarded("log the checkpoint", mlflow.log_artifacts, str(best_dir), "checkpoint")
        elif recipe.tracking.log_model:
            model_uri = tracker.log_best_model(best_dir)
            if recipe.tracking.register_as and model_uri:
                champion = tracker.guarded(
                    "register the model", register_and_maybe_promote, model_uri, tracker.run_id, recipe.tracking.register_as, recipe.task.metric_for_best,
                    state.best_metric, task.greater_is_better(recipe.task.metric_for_best), task.name, data.label_names,
                )
        problem = tracker.report_failures(recipe.output_dir)
        summary = RunEnd(
            metric=recipe.task.metric_for_best, best_step=state.best_step, steps=state.step,
            best_metrics=state.best_metrics, test_metrics=test_metrics, best_dir=best_dir, mlflow=tracker.url_hint,
            train_seconds=state.train_seconds, samples_per_second=throughput,
            peak_memory_mb=peaks.get("train/peak_memory_mb"), champion=champion, warnings=warnings,
            tracking_problem=problem, serves=task.serves,
        )
    accelerator.wait_for_everyone()
    return FinalReport(test_metrics, model_uri, champion, problem, summary, warnings)
