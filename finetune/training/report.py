"""What a training run tells the person watching it, as facts; how they look is the caller's.

`train.main` calls a `RunReport` at each stage: the data is ready, training starts, the loss moved, an
evaluation finished, the run finished. This base class says nothing, so training used as a library prints
nothing (its warnings go through `logging`); `finetune run` passes `finetune.cli.console.TerminalReport`.
Only the main process of a multi-process run reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.models.modeling import NewWeights
from finetune.models.pretrained import ResolvedCheckpoint


@dataclass
class RunStart:
    """What is trained on what, known when training starts."""

    checkpoint: ResolvedCheckpoint
    family: str
    parameters: int
    new_weights: NewWeights
    num_labels: int | None
    total_steps: int
    steps_per_epoch: int
    train_examples: int
    eval_examples: int
    processes: int
    device: str
    """Where the model runs, e.g. `cpu, 2 threads` or `cuda, NVIDIA A100`."""
    precision: str
    """How training computes, e.g. `fp32` or `bf16 autocast`."""
    cache_hit: bool
    resumed_at: int | None
    run_id: str | None
    notes: list[str] = field(default_factory=list)
    """What the run started from and what trains, when it is not a fresh head on a pretrained encoder (a parent
    model, its head reused or replaced; frozen parts; an adapter), one sentence each."""
    tokenizer_fit: Any = None
    """How well the checkpoint's vocabulary fits the train texts (`finetune.models.tokenizer_fit.TokenizerFit`;
    None: not measured)."""


@dataclass
class RunEnd:
    """How the run ended: the best evaluation, where the model and the MLflow run are, and what to look into."""

    metric: str
    best_step: int | None
    steps: int
    best_metrics: dict[str, float]
    test_metrics: dict[str, float]
    best_dir: Path
    mlflow: str
    """Where the MLflow run is (`Tracker.url_hint`)."""
    train_seconds: float
    samples_per_second: float
    peak_memory_mb: float | None
    champion: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    """The task's warnings about the best model's evaluation outputs (`Task.evaluation_warnings`)."""
    tracking_problem: str | None = None
    serves: bool = True
    """False when the run made a checkpoint to fine-tune (masked_lm), not a model that answers."""


class Progress:
    """The live progress of training (one update per optimizer step); this one shows nothing."""

    def update(self, steps: int = 1) -> None:
        pass

    def show(self, loss: float, samples_per_second: float) -> None:
        pass

    def close(self) -> None:
        pass


class RunReport:
    """Receives a run's facts as they become known; this base class ignores them (a library does not print)."""

    def data_ready(self, recipe: Any, data: Any) -> None:
        """The data is loaded, labelled, split and tokenised (`PreparedData`)."""

    def training_starts(self, start: RunStart) -> None:
        """The model is built and training is about to start (or continue, when resumed)."""

    def progress(self, total: int, initial: int) -> Progress:
        """A progress display for `total` optimizer steps, `initial` of them already done."""
        return Progress()

    def evaluated(self, step: int, metric: str, metrics: dict[str, float], best: float | None,
                  best_step: int | None) -> None:
        """An evaluation finished; `metric` is the one the best model is chosen on."""

    def finished(self, end: RunEnd) -> None:
        """The run is over: the best model is saved and logged."""


def describe_layer_lr_decay(learning_rate: float, decay: float | None, layers: int) -> str | None:
    """The header's sentence about layer-wise learning-rate decay (None: off), with the rates it gives
    (`finetune.training.optim.learning_rate_of`)."""
    if decay is None:
        return None
    return (f"Layer-wise learning-rate decay {decay:g}: the top of {layers} encoder layers trains at {learning_rate:.3g}, "
            f"each layer below at {decay:g}x the one above, the embeddings at {learning_rate * decay ** layers:.3g}.")


def describe_teacher(distillation: Any, lineage: dict[str, str]) -> str:
    """The header's sentence about distillation: the teacher (`finetune.training.teacher.teacher_lineage`), its run,
    and how its outputs are mixed in."""
    d = distillation
    run = f" (MLflow run {lineage['finetune.teacher_run_id']})" if lineage.get("finetune.teacher_run_id") else ""
    hidden = f", hidden-state weight {d.hidden_weight:g}" if d.hidden_weight else ""
    return (f"Distilled from {lineage['finetune.teacher']}{run}: temperature {d.temperature:g}, alpha {d.alpha:g}"
            f"{hidden}; teacher outputs computed in {lineage['finetune.teacher_precision']}.")


def header_notes(recipe: Any, model: Any, resolved: dict[str, str], teacher: dict[str, str]) -> list[str]:
    """The run header's lines about how it trains beyond the model and data: what the automatic settings resolved
    to (`finetune.training.speed.resolved_settings`), layer-wise learning-rate decay, the distillation teacher."""
    from finetune.models.layers import depths
    from finetune.training.speed import describe_resolved

    lines = [describe_resolved(resolved)]
    cfg = recipe.training
    if cfg.layer_lr_decay is not None:
        lines.append(describe_layer_lr_decay(cfg.learning_rate, cfg.layer_lr_decay, depths(model)[1]))
    if recipe.distillation is not None:
        lines.append(describe_teacher(recipe.distillation, teacher))
    return lines

