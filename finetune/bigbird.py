"""BigBird attention, chosen deliberately for every batch.

transformers' BigBird silently switches a block-sparse model to full attention the first time
it sees a short batch, and never switches back (transformers issue 20031). Here the attention
type is decided before each forward pass from the batch's padded length, set explicitly, and the
configured type is restored afterwards, so no batch inherits the state the previous one left.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch


def is_bigbird(model: torch.nn.Module) -> bool:
    return getattr(getattr(model, "config", None), "model_type", None) == "big_bird"


def min_sparse_length(block_size: int, num_random_blocks: int) -> int:
    """Shortest padded length at which block-sparse attention can run (transformers falls back at or below
    (5 + 2 * num_random_blocks) * block_size)."""
    return (5 + 2 * num_random_blocks) * block_size + 1


def attention_for_length(configured: str, length: int, block_size: int, num_random_blocks: int) -> str:
    """The attention type a batch of this padded length runs with."""
    if configured == "block_sparse" and length < min_sparse_length(block_size, num_random_blocks):
        return "original_full"
    return configured


@contextmanager
def attention_for_batch(model: torch.nn.Module, input_ids: torch.Tensor, counts: dict[str, int] | None = None) -> Iterator[str]:
    """Run the enclosed forward pass with the attention type chosen for this batch, then restore the configured one.

    `counts` (optional) tallies how many batches ran with each type, so the choice is visible in logs.
    """
    if not is_bigbird(model):
        yield "default"
        return
    base = model.base_model  # BigBirdModel: the object whose attention type transformers flips
    config = model.config
    configured = config.attention_type
    chosen = attention_for_length(configured, input_ids.shape[1], config.block_size, config.num_random_blocks)
    base.set_attention_type(chosen)
    if counts is not None:
        counts[chosen] = counts.get(chosen, 0) + 1
    try:
        yield chosen
    finally:
        base.set_attention_type(configured)
