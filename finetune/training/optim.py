"""Optimizer and learning-rate schedule of a recipe's training section."""

from __future__ import annotations

import torch
from transformers import get_scheduler

from finetune.config.recipe import TrainingSection

# Recipe names -> transformers scheduler names (a registry, so YAML never names code).
SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def make_optimizer(model: torch.nn.Module, cfg: TrainingSection) -> torch.optim.Optimizer:
    """AdamW with weight decay on weight matrices only (not on biases or LayerNorm weights)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "LayerNorm" in name or "layer_norm" in name else decay).append(param)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass over memory: measured 1.1-1.2x faster per training
    # step than foreach on 2 CPU cores (most at short sequences, where the optimizer step is a large share).
    try:
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, fused=True)
    except RuntimeError:  # parameters on a device without a fused kernel
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, foreach=True)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingSection, total_steps: int, num_processes: int):
    """Warmup then the recipe's schedule, counted in optimizer steps.

    Accelerate's prepared scheduler steps once per process at every optimizer step, so the
    schedule is laid out in those units.
    """
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps + 0.999)
    return get_scheduler(
        SCHEDULERS[cfg.scheduler], optimizer,
        num_warmup_steps=warmup * num_processes, num_training_steps=total_steps * num_processes,
    )
