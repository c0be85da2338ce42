"""The training loop: one recipe in, one fine-tuned model (and one MLflow run) out.

Read it top to bottom: `main` sets up the Accelerator, then `setup_data`, `setup_model`, and
alternates `train_one_epoch` and `evaluate` (finetune.training.evaluation), calling `save_checkpoint`
at every evaluation (the best model, and the full training state for resuming). The loss is the task
definition's (`Task.loss`), computed from the model's outputs. It runs unchanged on CPU, one GPU, or
several processes under `accelerate launch`. What happens after training (final scores, artifacts, the
logged and registered model) is in `finetune.training.finish`. What the run tells a person goes to a
`RunReport` (finetune.training.report), as facts; the loop itself prints nothing.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from finetune.config.recipe import Recipe, TrainingSection, recipe_to_yaml
from finetune.data import batching
from finetune.data.features import PreparedData, prepare
from finetune.errors import CheckpointError, TrainingDiverged
from finetune.evaluation.extra_metrics import ExtraMetrics
from finetune.families import family_of
from finetune.models import layers, pretrained, tokenizer_fit
from finetune.models.bigbird import attention_for_batch, is_block_sparse
from finetune.models.modeling import ModelInfo, NewWeights, load_tokenizer, make_collator, save_model_dir
from finetune.models.starting import BuiltModel, Start, build_for_run
from finetune.tasks import Reference, Task, TaskSettings
from finetune.tasks.distillation import DistilledTask
from finetune.tasks.metrics import is_improvement
from finetune.threads import ThreadBudget, requested_threads, use_budget
from finetune.tracking.tracker import NullTracker, Tracker, tracking_uri
from finetune.training import contrastive, finish, outputs, speed, teacher
from finetune.training import state as training_state
from finetune.training.evaluation import evaluate
from finetune.training.host_memory import FreedMemory
from finetune.training.optim import make_optimizer, make_scheduler
from finetune.training.preflight import preflight
from finetune.training.report import Progress, RunReport, RunStart, header_notes

log = logging.getLogger(__name__)


@dataclass
class RunState:
    """Where training is; saved with every checkpoint so a resumed run continues exactly."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batches_in_epoch: int = 0  # batches of the current epoch already trained on
    samples: int = 0  # training examples seen, all processes
    best_metric: float | None = None
    best_step: int | None = None
    best_metrics: dict[str, float] = field(default_factory=dict)
    evals_without_improvement: int = 0
    last_eval_step: int = -1
    stop: bool = False
    attention_counts: dict[str, int] = field(default_factory=dict)
    train_seconds: float = 0.0
    run_id: str | None = None
    recipe_hash: str = ""

    @classmethod
    def from_saved(cls, counters: Any, checkpoint: Path) -> "RunState":
        """The counters a checkpoint saved; keys this version does not know (a newer finetune wrote them) are
        ignored, and counters that are not an object are refused with the checkpoint's name."""
        if not isinstance(counters, dict):
            raise CheckpointError(f"cannot resume from {checkpoint}: its {training_state.STATE_FILE} holds "
                                  f"{type(counters).__name__}, not the training counters")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(counters) - known)
        if unknown:
            log.warning(f"{checkpoint}: ignoring training counters this version does not know: {', '.join(unknown)}")
        return cls(**{k: v for k, v in counters.items() if k in known})


@dataclass
class TrainingHooks:
    """Calls into a run from outside the loop (a sweep's pruner, the training benchmark's clock)."""

    on_train_begin: Callable[[], None] | None = None
    """Called once, just before the first training batch (resumed runs included)."""
    on_evaluate: Callable[[int, dict[str, float]], bool] | None = None
    """Called after every evaluation with the step and the metrics; returning True stops training early."""
    on_step: Callable[[int], None] | None = None
    """Called after every optimizer step with the step number (the training benchmark's time to the first steps)."""


def diverged(step: int, lr: float, output_dir: str) -> TrainingDiverged:
    last = training_state.latest_checkpoint(output_dir)
    kept = f"the last good checkpoint is {last}" if last else "no checkpoint had been written yet"
    return TrainingDiverged(
        f"the loss is not a finite number at step {step} (learning rate {lr:.3g}); {kept}. Try a lower "
        "training.learning_rate, a longer warmup, training.max_grad_norm (e.g. 1.0), or mixed_precision: no."
    )


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
    resumed_from: int | None = None
    """The step a resumed run continued from."""
    tracking_problem: str | None = None
    """What did not reach MLflow, if the tracking server failed during the run."""


# ---------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------


def setup_data(recipe: Recipe, task: Task, tokenizer: Any, accelerator: Accelerator) -> PreparedData:
    """Load, label, split and tokenise once (on the main process first, so others read its cache)."""
    with accelerator.main_process_first():
        return prepare(recipe, task, tokenizer)


def setup_model(recipe: Recipe, task: Task, start: Start, label_names: list[str] | None,
                pair_phase: contrastive.PairPhase | None = None) -> tuple[Any, BuiltModel, layers.Trainable]:
    """The model to train (`finetune.models.starting`: a pretrained encoder with a fresh head, or a fine-tuned
    model's), frozen as `training.freeze` says, with a frozen encoder's outputs cached when the head allows it, and
    compiled if the recipe says so. `pair_phase`: the encoder trained by training.method contrastive, put in before
    anything is frozen or cached, with the pooling it was trained with."""
    model_cfg = recipe.model if pair_phase is None else recipe.model.model_copy(update={"pooling": pair_phase.pooling})
    built = build_for_run(start, model_cfg, task, label_names)
    model = built.model
    if pair_phase is not None:
        pair_phase.install(model)
        built.notes.append(pair_phase.note)
    fresh = getattr(model, "finetune_fresh_parameters", frozenset())
    trainable = layers.freeze(model, recipe.training.freeze, fresh) if built.adapter is None else \
        layers.count_parameters(model, "the encoder (an adapter trains)")
    # Not for block-sparse BigBird: its outputs depend on the padded length of the batch a text comes in.
    if (recipe.training.freeze == "encoder" and layers.encoder_frozen(model) and not recipe.training.compile
            and not is_block_sparse(model.config)):
        # One vector per text when the head reads only the first position of right-padded batches; otherwise
        # every position's (ModernBERT's mean and EuroBERT's late pooling, per-token heads).
        first_only = (task.pooled_head and family_of(model.config).head_reads_first_token(model.config)
                      and built.tokenizer.padding_side == "right")
        layers.FrozenFeatureCache(layers.base_module(model), first_only)
        built.notes.append("The frozen encoder's outputs were computed once per text and cached; only the head trained.")
    if recipe.training.freeze != "none" and built.adapter is None:
        built.notes.append(f"Frozen: {trainable.frozen}; {trainable.trainable:,} of {trainable.total:,} parameters trained.")
    if recipe.training.head_only_steps:
        built.notes.append(f"The head trained alone for the first {recipe.training.head_only_steps} steps (the encoder "
                           "standing still), then everything did.")
    if built.adapter is not None:
        a = built.adapter
        built.notes.append(f"A LoRA adapter (r {a['r']}, alpha {a['alpha']:g}, on {', '.join(a['target_modules'])}) and the "
                           f"head trained: {trainable.trainable:,} of {trainable.total:,} parameters; the saved model is "
                           f"the adapter, the head and the base reference {a['base']['checkpoint']!r}.")
    return speed.prepare_model(model, recipe.training), built, trainable


def train_one_epoch(
    model, loader, optimizer, scheduler, accelerator: Accelerator, task: Task, settings: TaskSettings,
    cfg: TrainingSection, autocast, state: RunState, total_steps: int, progress: Progress, tracker,
    on_step_end: Callable[[], None], output_dir: str, threads: ThreadBudget,
) -> None:
    """One pass over the training data (or until max_steps), logging loss, learning rate and throughput."""
    model.train()
    unwrapped = accelerator.unwrap_model(model)
    running_loss = torch.zeros((), device=accelerator.device)
    loss_count, window_start, window_samples = 0, time.perf_counter(), 0
    freed = FreedMemory()
    for batch in loader:
        threads.apply()  # fewer threads while another process keeps a core busy (finetune.threads)
        inputs, targets = task.split_batch(batch)
        with accelerator.accumulate(model):
            # The loss inside the autocast region, as the Hugging Face heads compute it: autocast runs the
            # loss functions in fp32 whatever the logits' precision.
            with attention_for_batch(unwrapped, inputs["input_ids"], state.attention_counts), autocast:
                loss = task.loss(task.forward(model, inputs, targets), targets, settings)
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
        state.batches_in_epoch += 1
        window_samples += batch_samples
        if not accelerator.sync_gradients:
            continue
        state.step += 1
        progress.update(1)
        if state.step % cfg.logging_steps == 0 or state.step == total_steps:
            mean_loss = accelerator.reduce(running_loss / loss_count, reduction="mean").item()
            if not math.isfinite(mean_loss):
                raise diverged(state.step, scheduler.get_last_lr()[0], output_dir)
            elapsed = time.perf_counter() - window_start
            throughput = window_samples / elapsed if elapsed > 0 else 0.0
            tracker.log_metrics(
                {"train/loss": mean_loss, "train/learning_rate": scheduler.get_last_lr()[0],
                 "train/samples_per_second": throughput, **speed.gpu_memory_metrics(accelerator.device)},
                step=state.step,
            )
            progress.show(mean_loss, throughput)
            running_loss.zero_()
            loss_count, window_start, window_samples = 0, time.perf_counter(), 0
        on_step_end()
        freed.after_step(state.step)
        if state.stop or state.step >= total_steps:
            return


def save_checkpoint(accelerator: Accelerator, model, optimizer, scheduler, tokenizer, recipe: Recipe,
                    info: ModelInfo, state: RunState, improved: bool) -> None:
    """Save the training state for resuming, and the model as the best one when it improved (both atomically)."""
    accelerator.wait_for_everyone()
    if improved and accelerator.is_main_process:
        save_model_dir(Path(recipe.output_dir) / "best", accelerator.unwrap_model(model), tokenizer, info,
                       recipe_to_yaml(recipe))
    training_state.save_training_state(accelerator, model, optimizer, scheduler, asdict(state), recipe.output_dir,
                                       keep=recipe.training.save_total_limit)


# ---------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------


def main(recipe: Recipe, resume_run: bool = False, nested: bool = False,
         hooks: TrainingHooks | None = None, overwrite: bool = False, report: RunReport | None = None) -> RunResult:
    """Fine-tune as the recipe says; log to MLflow; return the best metrics and where the model is.

    `resume_run` continues from the newest checkpoint in output_dir (and its MLflow run). `nested`
    makes the MLflow run a child of the active one (sweeps). `hooks` lets a caller watch and stop the run
    (see `TrainingHooks`); `report` is told what a person watching it wants to know (see `RunReport`).
    `overwrite` lets the run use an output_dir finetune did not make.
    """
    try:
        return _train(recipe, resume_run, nested, hooks, overwrite, report)
    finally:  # a run that raised is no longer in progress, though this process lives on (sweeps, notebooks)
        outputs.release(recipe.output_dir)
        speed.release_accelerator()


def _train(recipe: Recipe, resume_run: bool, nested: bool, hooks: TrainingHooks | None, overwrite: bool,
           report: RunReport | None) -> RunResult:
    cfg = recipe.training
    hooks = hooks or TrainingHooks()
    settings = TaskSettings.of(recipe.task)
    task, start = preflight(recipe, overwrite)
    resolved = start.resolved
    # Loaded before anything trains, so a metric that cannot be loaded fails now, not after the first epoch.
    extra = ExtraMetrics(recipe.task.extra_metrics, task, allow_code=recipe.task.allow_metric_code) \
        if recipe.task.extra_metrics else None
    if recipe.distillation is not None:
        d = recipe.distillation
        task = DistilledTask(task, d.temperature, d.alpha, d.hidden_weight)
    accelerator = speed.new_accelerator(recipe)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but Accelerate runs each one alone ({accelerator.distributed_type}); "
            "they would train separate models. On machines without a GPU, launch with ACCELERATE_USE_CPU=1 "
            "(see recipes/accelerate/cpu-2proc.yaml)."
        )
    report = report if report is not None and accelerator.is_main_process else RunReport()
    threads = ThreadBudget(cfg.threads or requested_threads(),
                           processes=int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes)))
    threads.apply()
    outer_budget = use_budget(threads)  # the teacher's pass and evaluation follow the run's budget too
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(resolved.path, recipe.model.trust_remote_code)
    data = setup_data(recipe, task, tokenizer, accelerator)
    report.data_ready(recipe, data)
    # Measured once, by the process that reports and logs (a fraction of a second: a bounded sample).
    fit = tokenizer_fit.measure(data.raw_train, recipe, task, tokenizer) if accelerator.is_main_process else None
    settings = task.settings_for_training(settings, data.train, data.label_names)  # class_weights: balanced -> numbers
    if recipe.distillation is not None:
        with accelerator.main_process_first():  # the main process computes the teacher's outputs, the others read them
            data = teacher.add_teacher_outputs(data, recipe, pretrained.load_config(resolved).hidden_size)
    pair_phase = contrastive.train_body(recipe, data.raw_train[recipe.data.text_column], data.raw_train["labels"],
                                        resolved.path, accelerator.device, threads, data.label_names) \
        if cfg.method == "contrastive" else None
    model, built, trainable = setup_model(recipe, task, start, data.label_names, pair_phase)
    new_weights = getattr(model, "finetune_new_weights", None) or NewWeights([], [], [])
    parameters, family = sum(p.numel() for p in model.parameters()), model.config.model_type  # before DDP wraps it
    collator = make_collator(tokenizer, model.config, task, settings, speed.pad_multiple(recipe), recipe.model.max_length)
    # The shuffle generator is re-seeded with seed + epoch at each epoch, so a resumed run sees the same order.
    generator = torch.Generator()
    train_dl = batching.train_loader(data.train, cfg, collator, generator, accelerator.num_processes)
    eval_dl = batching.eval_loader(data.eval, collator, cfg.eval_batch_size)
    eval_reference = Reference(data.eval_features, data.raw_eval, recipe.data)
    optimizer = make_optimizer(model, cfg)
    model, optimizer, train_dl, eval_dl = accelerator.prepare(model, optimizer, train_dl, eval_dl)
    updates_per_epoch = max(1, math.ceil(len(train_dl) / cfg.gradient_accumulation_steps))
    total_steps = cfg.max_steps or math.ceil(cfg.num_epochs * updates_per_epoch)
    scheduler = accelerator.prepare(make_scheduler(optimizer, cfg, total_steps, accelerator.num_processes))

    # Running an interrupted recipe again continues it; --resume continues even if the recipe changed.
    state = RunState(recipe_hash=hashlib.sha256(recipe_to_yaml(recipe).encode()).hexdigest()[:16])
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            outputs.claim(recipe.output_dir, recipe.name, state.recipe_hash, store=tracking_uri(recipe))
            # The recipe as run, beside its log, even if no model is ever saved; written once the folder is marked as
            # finetune's, so a run refused before then leaves nothing that would make its own rerun refuse the folder.
            (Path(recipe.output_dir) / "recipe.yaml").write_text(recipe_to_yaml(recipe))
            outputs.recover(recipe.output_dir)
            checkpoint = training_state.find_resumable(recipe.output_dir, state.recipe_hash, resume_run, outputs.warn)
        else:  # the main process has already checked, recovered and set aside what it will not resume
            checkpoint = training_state.latest_checkpoint(recipe.output_dir)
    if checkpoint is not None:
        state = RunState.from_saved(
            training_state.load_training_state(accelerator, model, optimizer, scheduler, checkpoint), checkpoint)
    elif resume_run and accelerator.is_main_process:
        log.warning(f"nothing to resume in {recipe.output_dir}/checkpoints: starting from the beginning")
    resumed_from = state.step if checkpoint is not None else None
    info = ModelInfo(
        task=task.name, label_names=data.label_names, text_pair=recipe.data.text_pair_column is not None,
        max_length=recipe.model.max_length, checkpoint=recipe.model.checkpoint, recipe_name=recipe.name,
        pad_to_multiple_of=speed.pad_multiple(recipe), metrics=state.best_metrics, settings=settings.saved(), adapter=built.adapter,
        parent=None if start.parent is None else {
            "source": start.parent_source, "run_id": start.parent_run_id, "task": start.parent.task,
            "label_names": start.parent.label_names, "head_reused": built.head_reused},
    )
    metric = recipe.task.metric_for_best
    greater = task.greater_is_better(metric)
    lineage = {} if start.parent is None else {
        "finetune.parent_model": start.parent_source, "finetune.parent_run_id": start.parent_run_id or "",
        "finetune.parent_head": "reused" if built.head_reused else "replaced"}
    tags = {"finetune.checkpoint_source": resolved.source, "finetune.device": speed.describe_device(accelerator.device),
            **lineage}
    resolved_settings = speed.resolved_settings(recipe, threads, accelerator.unwrap_model(model), task, settings,
                                                data.label_names)
    teacher_lineage = teacher.teacher_lineage(recipe) if recipe.distillation is not None else {}
    tags.update(teacher_lineage)
    if pair_phase is not None:
        tags["finetune.training_method"] = pair_phase.note
    run_notes = header_notes(recipe, accelerator.unwrap_model(model), resolved_settings, teacher_lineage)
    tracker = (
        Tracker(recipe, tags, run_id=state.run_id, nested=nested, resolved=resolved_settings)
        if accelerator.is_main_process else NullTracker()
    )
    # Every process keeps the run id in its checkpoint state, so it comes from the main one.
    state.run_id = broadcast_object_list([tracker.run_id])[0] if accelerator.num_processes > 1 else tracker.run_id
    tracker.log_inputs(data)
    if resumed_from is None:
        tracker.log_metrics({"model/trainable_parameters": trainable.trainable, "model/total_parameters": trainable.total,
                             "model/trainable_share": trainable.share}, step=0)
    if pair_phase is not None and resumed_from is None:
        pair_phase.log(tracker)
    if fit is not None and resumed_from is None:  # a resumed run logged them when it started
        import mlflow

        tracker.guarded("log the tokenizer fit", mlflow.log_params, fit.params())
    if start.parent is not None and resumed_from is None:
        tracker.log_parent(start.parent_source, start.parent_run_id, start.parent.task, built.head_reused)
    if accelerator.is_main_process:
        outputs.update_marker(recipe.output_dir, mlflow_run_id=state.run_id)
    report.training_starts(RunStart(
        checkpoint=resolved, family=family, parameters=parameters, new_weights=new_weights,
        num_labels=len(data.label_names) if data.label_names else None, total_steps=total_steps,
        steps_per_epoch=updates_per_epoch, train_examples=len(data.train), eval_examples=len(data.eval),
        processes=accelerator.num_processes, device=speed.describe_device(accelerator.device, threads),
        precision=speed.describe_precision_decision(recipe), cache_hit=data.cache_hit, resumed_at=resumed_from,
        run_id=state.run_id, notes=[*built.notes, *run_notes], tokenizer_fit=fit,
    ))

    def run_evaluation() -> None:
        metrics, _ = evaluate(model, eval_dl, accelerator, task, settings, eval_reference, data.label_names, extra)
        if not math.isfinite(metrics["loss"]):  # broken weights must never become a checkpoint
            raise diverged(state.step, scheduler.get_last_lr()[0], recipe.output_dir)
        state.last_eval_step = state.step
        tracker.log_metrics({f"eval/{k}": v for k, v in metrics.items()}, step=state.step)
        improved = is_improvement(metrics[metric], state.best_metric, greater)
        if improved:
            state.best_metric, state.best_step, state.best_metrics = metrics[metric], state.step, metrics
            state.evals_without_improvement = 0
            info.metrics = metrics
        else:
            state.evals_without_improvement += 1
            if cfg.early_stopping_patience and state.evals_without_improvement >= cfg.early_stopping_patience:
                state.stop = True
        state.train_seconds += time.perf_counter() - started
        save_checkpoint(accelerator, model, optimizer, scheduler, tokenizer, recipe, info, state, improved)
        reset_clock()
        if hooks.on_evaluate is not None and hooks.on_evaluate(state.step, metrics):
            state.stop = True
        report.evaluated(state.step, metric, metrics, state.best_metric, state.best_step)

    def on_step_end() -> None:
        if hooks.on_step is not None:
            hooks.on_step(state.step)
        if cfg.eval_strategy == "steps" and state.step % cfg.eval_steps == 0:
            run_evaluation()

    def reset_clock() -> None:
        nonlocal started
        started = time.perf_counter()

    status = "FAILED"
    started = time.perf_counter()
    try:
        progress = report.progress(total_steps, state.step)
        autocast = speed.training_autocast(recipe)
        if hooks.on_train_begin is not None:
            hooks.on_train_begin()
        while state.step < total_steps and not state.stop:
            generator.manual_seed(cfg.seed + state.epoch)
            loader = accelerator.skip_first_batches(train_dl, state.batches_in_epoch) if state.batches_in_epoch else train_dl
            train_one_epoch(model, loader, optimizer, scheduler, accelerator, task, settings, cfg, autocast, state,
                            total_steps, progress, tracker, on_step_end, recipe.output_dir, threads)
            if state.step < total_steps and not state.stop:
                state.epoch, state.batches_in_epoch = state.epoch + 1, 0
            if cfg.eval_strategy == "epoch" and state.last_eval_step != state.step:
                run_evaluation()
        if state.last_eval_step != state.step:
            run_evaluation()
        progress.close()
        final = finish.finish_run(recipe, task, data, collator, accelerator, tracker, state, settings, built.notes, extra)
        if accelerator.is_main_process:
            training_state.mark_finished(recipe.output_dir, cfg.keep_checkpoints)
            outputs.update_marker(recipe.output_dir, state="finished")
        status = "FINISHED"
    finally:
        threads.close()
        use_budget(outer_budget)
        tracker.end(status)
    report.finished(final.summary)
    return RunResult(state.best_metrics, final.test_metrics, Path(recipe.output_dir) / "best", state.run_id,
                     final.model_uri, state.step, state.train_seconds, state.attention_counts, resumed_from,
                     final.tracking_problem)
