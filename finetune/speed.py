"""Hardware settings of the training loop: precision, compilation, host-to-device copies, threads.

Each choice here was measured (BENCHMARKS.md, `bench/train.py`); the GPU ones follow the PyTorch and
Accelerate performance guides and are written so the same recipe runs unchanged on a CPU or a GPU.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate.utils import DataLoaderConfiguration

from finetune.preflight import choose_mixed_precision
from finetune.recipe import TrainingSection


def accelerator_options(cfg: TrainingSection) -> dict[str, Any]:
    """Keyword arguments for `Accelerator`: mixed precision, and asynchronous copies of pinned batches on CUDA."""
    cuda = torch.cuda.is_available()
    # With pinned host memory (train_loader pins on CUDA) a non-blocking copy overlaps the next batch's
    # transfer with compute instead of stalling the step on it.
    return {"mixed_precision": choose_mixed_precision(cfg.mixed_precision),
            "dataloader_config": DataLoaderConfiguration(non_blocking=cuda)}


def prepare_model(model: torch.nn.Module, cfg: TrainingSection) -> torch.nn.Module:
    """Compile in place when the recipe asks (`nn.Module.compile`), so state-dict keys, saving and resuming are unchanged."""
    if cfg.compile:
        # dynamic=None: the first new sequence length recompiles once with symbolic shapes, later ones reuse it.
        model.compile(dynamic=None)
    return model


def set_threads() -> None:
    """Intra-op threads: every usable core (torch counts all cores of the machine, not the ones we may use).

    Respects OMP_NUM_THREADS when set, as torch does.
    """
    if "OMP_NUM_THREADS" in os.environ or not hasattr(os, "sched_getaffinity"):
        return
    usable = len(os.sched_getaffinity(0))
    if usable and torch.get_num_threads() != usable:
        torch.set_num_threads(usable)
