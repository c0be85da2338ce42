"""BigBird: BERT's layers with block-sparse attention for long inputs (`finetune.models.bigbird` chooses the
attention type per batch). Batches are padded to a multiple of the block size, the recipe states the attention type
and may set the block layout, and block-sparse models cannot be exported to ONNX. Its pooler is a bare Linear (+
tanh) that only the multiple-choice head reads."""

from __future__ import annotations

from typing import Any, Callable

import torch

from finetune.families.base import Family


def min_sparse_length(block_size: int, num_random_blocks: int) -> int:
    """Shortest padded length at which block-sparse attention can run (transformers falls back at or below
    (5 + 2 * num_random_blocks) * block_size)."""
    return (5 + 2 * num_random_blocks) * block_size + 1


def default_sparse_min_length(block_size: int, num_random_blocks: int) -> int:
    """The default rule's threshold: the shortest multiple of block_size at which block-sparse can run.

    Batches are padded to multiples of block_size, so this is the first padded length that can use it.
    """
    shortest = min_sparse_length(block_size, num_random_blocks)
    return -(-shortest // block_size) * block_size


class BigBirdFamily(Family):
    name = "big_bird"
    description = "BigBird (block-sparse attention for long documents)"
    lora_targets = ("query", "value")
    mlm_head = ("cls",)

    @staticmethod
    def is_block_sparse(config: Any) -> bool:
        return getattr(config, "attention_type", None) == "block_sparse"

    def pad_multiple(self, config: Any) -> int:
        return config.block_size

    def pooler(self, encoder: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
        linear = getattr(encoder, "pooler", None)
        if linear is None:
            return None
        return lambda hidden: encoder.activation(linear(hidden[:, 0, :]))

    def export_problem(self, config: Any) -> str | None:
        if self.is_block_sparse(config):
            return ("BigBird with block_sparse attention cannot be exported to ONNX: its sparse attention pattern is "
                    "built with Python control flow that tracing freezes into a wrong graph. Export a model trained "
                    "with model.attention_type: original_full, or serve this one with the PyTorch backend.")
        return None

    def check_settings(self, config: Any, model: Any) -> list[str]:
        problems: list[str] = []
        if model.attention_type is None:
            return [
                "model.attention_type: BigBird recipes must state it; allowed: block_sparse, original_full "
                f"(the checkpoint's default is {config.attention_type})"
            ]
        if model.attention_type != "block_sparse":
            return problems
        block = model.block_size or config.block_size
        rand = model.num_random_blocks if model.num_random_blocks is not None else config.num_random_blocks
        shortest = min_sparse_length(block, rand)
        if model.max_length < shortest:
            problems.append(
                f"model.max_length: {model.max_length} is too short for block_sparse attention with block_size "
                f"{block} and num_random_blocks {rand}; allowed: at least {shortest} "
                f"(= (5 + 2 x {rand}) x {block} + 1), or use attention_type original_full"
            )
        if model.max_length % block:
            problems.append(
                f"model.max_length: {model.max_length} is not a multiple of block_size {block}; "
                f"allowed: a multiple such as {(model.max_length // block + 1) * block}"
            )
        rule = model.sparse_attention_min_length
        if rule is not None and rule < shortest:
            problems.append(
                f"model.sparse_attention_min_length: {rule} is below the {shortest} tokens block-sparse attention needs "
                f"with block_size {block} and num_random_blocks {rand}; allowed: at least {shortest}"
            )
        elif rule is not None and rule > model.max_length:
            problems.append(
                f"model.sparse_attention_min_length: {rule} is longer than model.max_length {model.max_length}, so no "
                f"batch would use block_sparse; allowed: {shortest} to {model.max_length}, or attention_type original_full"
            )
        return problems


BIG_BIRD = BigBirdFamily()


def is_bigbird(config: Any) -> bool:
    """Whether a config (or a model's, or an exported model's stand-in's) is a BigBird's."""
    from finetune.families.registry import family_of

    return isinstance(family_of(getattr(config, "config", config)), BigBirdFamily)


def is_block_sparse(config: Any) -> bool:
    """Whether a config is a BigBird's set up for block-sparse attention (chosen per batch by the rule)."""
    return is_bigbird(config) and BigBirdFamily.is_block_sparse(config)
