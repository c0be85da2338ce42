"""Hardware settings of the training loop: precision, compilation, host-to-device copies, threads.

Each choice here was measured (BENCHMARKS.md, `bench/train.py`); the GPU ones follow the PyTorch and
Accelerate performance guides and are written so the same recipe runs unchanged on a CPU or a GPU.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, is_initialized
from accelerate.utils import DataLoaderConfiguration, DistributedType

from finetune.config.recipe import Recipe, TrainingSection
from finetune.errors import RecipeError
from finetune.training.preflight import choose_mixed_precision, precision_reason


def precision(recipe: Recipe) -> str:
    """The precision this run trains in ("no", "bf16" or "fp16"): the recipe's, with `auto` resolved for this machine.

    Block-sparse BigBird too: its sparse attention core runs in fp32 inside the autocast region
    (`finetune.models.bigbird.sparse_attention_in_fp32`, applied by `attention_for_batch` before every forward pass).
    """
    return choose_mixed_precision(recipe.training.mixed_precision)


def accelerator_options(recipe: Recipe) -> dict[str, Any]:
    """Keyword arguments for `Accelerator`: mixed precision on GPUs, and asynchronous copies of pinned batches on CUDA."""
    cuda = torch.cuda.is_available()
    # With pinned host memory (train_loader pins on CUDA) a non-blocking copy overlaps the next batch's
    # transfer with compute instead of stalling the step on it. On a CPU, bf16 goes through
    # training_autocast instead: Accelerate would wrap every forward pass, evaluation's too.
    return {"mixed_precision": precision(recipe) if cuda else "no",
            "dataloader_config": DataLoaderConfiguration(non_blocking=cuda)}


def new_accelerator(recipe: Recipe) -> Accelerator:
    """The run's Accelerator, even when something else in this process made one with another precision first.

    Accelerate keeps one AcceleratorState per process and refuses an Accelerator whose mixed precision differs
    from it. So an earlier Trainer(bf16=True) or Accelerator(mixed_precision="bf16") in the same notebook or test
    process made every later fp32 run fail with "AcceleratorState has already been initialized". A single-process
    state from before is dropped (its device and process state, PartialState, stay), and `release_accelerator`
    drops this run's when it ends; a distributed one is left alone, since `accelerate launch` made it for this run.
    """
    options = accelerator_options(recipe)
    if _single_process_state() and AcceleratorState().mixed_precision != options["mixed_precision"]:
        # How Accelerate's own test suite resets it between tests; there is no public call for it.
        AcceleratorState._reset_state()
    return Accelerator(gradient_accumulation_steps=recipe.training.gradient_accumulation_steps, **options)


def release_accelerator() -> None:
    """After a run in a single process: drop its AcceleratorState, so whatever the process does next (a Trainer
    with --bf16, another Accelerator) is not refused for the precision this run trained in."""
    if _single_process_state():
        AcceleratorState._reset_state()


def _single_process_state() -> bool:
    if not is_initialized():
        return False
    state = AcceleratorState()
    return state.num_processes == 1 and state.distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)


def trains_bf16_on_cpu(recipe: Recipe) -> bool:
    """Whether this run's training forward runs under bf16 autocast on a CPU (`training_autocast`)."""
    return not torch.cuda.is_available() and precision(recipe) == "bf16"


def training_autocast(recipe: Recipe) -> contextlib.AbstractContextManager:
    """bf16 autocast for the training forward pass on a CPU when the recipe's precision resolves to bf16.

    Only the training forward: evaluation then runs the fp32 weights in fp32, exactly as `finetune serve`,
    `predict` and the MLflow model do, so the metric that picks the best model is the one users get. The
    weights and optimizer state stay fp32 (autocast casts per operation). On GPUs Accelerate's own mixed
    precision applies (accelerator_options) and this is a no-op.
    """
    if not trains_bf16_on_cpu(recipe):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)


def pair_phase_bf16(recipe: Recipe) -> bool:
    """Whether the contrastive pair phase (`finetune.training.contrastive`) computes under bf16 autocast: when the run
    trains in bf16, on a CPU or a GPU. The pair phase is most of such a run's time and runs outside Accelerate's
    prepared loop, so it follows the run's precision here. fp16 (GPUs without bf16) keeps the pair phase in fp32: fp16
    needs a loss scaler, and the pair phase has no Accelerate optimizer to carry one."""
    return precision(recipe) == "bf16"


def prepare_model(model: torch.nn.Module, cfg: TrainingSection) -> torch.nn.Module:
    """Gradient checkpointing and compiling when the recipe asks; both in place (`nn.Module.compile`), so state-dict
    keys, saving and resuming are unchanged."""
    if cfg.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise RecipeError(f"training.gradient_checkpointing: {type(model).__name__} does not support it in "
                              "transformers; allowed here: false")
        # Non-reentrant: works with frozen inputs (adapters, frozen embeddings) and replays dropout's random state.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.compile:
        # dynamic=None: the first new sequence length recompiles once with symbolic shapes, later ones reuse it.
        model.compile(dynamic=None)
    return model


# Measured (BENCHMARKS.md, "Batch shapes"): see ModelSection.pad_to_multiple_of.
PAD_MULTIPLE = 16
PAD_MULTIPLE_LONG_CPU_BF16 = 32
"""Long inputs trained in bf16 on a CPU: resident memory grows with the number of distinct batch shapes under bf16
autocast; at 32 the QA recipe peaked 10% lower over 300 steps (same F1) and 2.84 GiB over the whole run."""
LONG_INPUTS = 256


def pad_multiple(recipe: Recipe) -> int:
    """The recipe's `model.pad_to_multiple_of`, with the default resolved for its inputs and this machine."""
    if recipe.model.pad_to_multiple_of is not None:
        return recipe.model.pad_to_multiple_of
    cpu_bf16 = trains_bf16_on_cpu(recipe)
    long = recipe.model.max_length >= LONG_INPUTS
    if long and cpu_bf16:
        return PAD_MULTIPLE_LONG_CPU_BF16
    return PAD_MULTIPLE if long or cpu_bf16 else 1


def gpu_memory_metrics(device: torch.device) -> dict[str, float]:
    """The GPU's peak allocated memory so far, in GiB, as a training metric (nothing on a CPU, where the run's
    resident memory is measured by MLflow's system metrics instead)."""
    if device.type != "cuda":
        return {}
    return {"train/gpu_peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30}


def describe_device(device: torch.device, threads: Any = None) -> str:
    """Where training runs, for the run's header: `cpu, 2 threads (...)`, `cuda, NVIDIA A100-SXM4-80GB`.

    `threads` is the run's `finetune.threads.ThreadBudget`, which says whether the count is fixed or follows the load.
    """
    if device.type == "cpu":
        return f"cpu, {threads.describe()}" if threads is not None else f"cpu, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        return f"cuda, {torch.cuda.get_device_name(device)}"
    return device.type


def describe_precision(recipe: Recipe) -> str:
    """How training computes (see `precision` and `training_autocast`)."""
    chosen = precision(recipe)
    if chosen == "no":
        return "fp32"
    if torch.cuda.is_available():
        return f"{chosen} mixed precision"
    return f"{chosen} autocast for training (this CPU computes {chosen}), fp32 for evaluation"


def describe_precision_decision(recipe: Recipe) -> str:
    """How training computes and why, for the run's header: `describe_precision` and what decided it
    (`finetune.training.preflight.precision_reason`: the recipe, the GPU, or the stored bf16 measurement)."""
    return f"{describe_precision(recipe)} ({precision_reason(recipe.training.mixed_precision)})"


def teacher_precision(recipe: Recipe) -> str:
    """`distillation.teacher_precision` resolved: auto is bf16 when the student trains in bf16 on a CPU, else fp32."""
    requested = recipe.distillation.teacher_precision
    if requested != "auto":
        return requested
    return "bf16" if trains_bf16_on_cpu(recipe) else "fp32"


def resolved_pooling(model: Any, pooled_head: bool) -> str | None:
    """What the head of a built model reads (`model.pooling` with `auto` resolved): first, mean, or the family's own
    value (e.g. EuroBERT's `late`); None for heads that read every token (per-token and span heads)."""
    from finetune.families import family_of
    from finetune.families.base import POOLING_CONFIG_KEY

    if not pooled_head:
        return None
    config = model.config
    family = family_of(config)
    if family.pooling_key is not None:
        value = getattr(config, family.pooling_key, None)
        named = {v: k for k, v in family.pooling_values.items()}
        return named.get(value, str(value))
    return getattr(config, POOLING_CONFIG_KEY, None) or "first"


def resolved_settings(recipe: Recipe, threads: Any, model: Any, task: Any, settings: Any,
                      label_names: list[str] | None) -> dict[str, str]:
    """Every automatic decision of a run, resolved once at its start: recipe key -> the value it resolved to.

    Logged as MLflow params `<key>.resolved` (`Tracker`) and said in the run's header, so two runs that differ only in
    what `auto` chose can be told apart (`finetune compare`). `threads` is the run's `finetune.threads.ThreadBudget`;
    `model` the built model (its pooling), `settings` the task settings training uses (`class_weights: balanced` as
    the numbers computed from the train split, per label).
    """
    import json

    from finetune.tasks.imbalance import weights_by_label

    pooling = resolved_pooling(model, getattr(task, "pooled_head", False))

    found = {
        "training.mixed_precision": precision(recipe),
        "training.threads": str(threads.fixed) if threads.fixed is not None else f"auto (up to {threads.limit})",
        "model.pad_to_multiple_of": str(pad_multiple(recipe)),
    }
    if pooling is not None:
        found["model.pooling"] = pooling
    if recipe.distillation is not None:
        found["distillation.teacher_precision"] = teacher_precision(recipe)
    weights = weights_by_label(getattr(settings, "class_weights", None), label_names)
    if weights is not None:
        found["task.class_weights"] = json.dumps(weights)
    return found


def describe_resolved(resolved: dict[str, str]) -> str:
    """The header's one line about what `auto` and the defaults resolved to (precision has its own line)."""
    # Precision has its own line; class weights, one per label, are in MLflow and the model's finetune.json.
    shown = {k: v for k, v in resolved.items() if k not in ("training.mixed_precision", "task.class_weights")}
    return "resolved: " + ", ".join(f"{k.rpartition('.')[2]} {v}" for k, v in shown.items())
