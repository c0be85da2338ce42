"""BigBird attention, chosen deliberately for every batch.

transformers' BigBird silently switches a block-sparse model to full attention the first time
it sees a short batch, and never switches back (transformers issue 20031). Here the attention
type is decided before each forward pass from the batch's padded length, set explicitly, and the
configured type is restored afterwards, so no batch inherits the state the previous one left.

The rule: a batch runs block-sparse attention when its padded length is at least the model's
`sparse_attention_min_length` (the recipe's `model.sparse_attention_min_length`, saved in the model's
config.json and finetune.json so evaluation and serving apply the rule training used), else full
attention. It is never below the length transformers needs for block-sparse, so transformers' own
silent fallback never fires.

Evaluation is deterministic: in eval mode transformers draws no random blocks (they are all block 0,
transformers PR 23056), and `plan_batches` keeps the inputs that run block-sparse apart from inputs
of other padded lengths, because a block-sparse input's result depends on the padded length (the last
global block and the sliding windows move with it).

Mixed precision: transformers' block-sparse attention fails under autocast (it scatters float32 softmax
weights into a tensor of the half-precision matmul's dtype). `sparse_attention_in_fp32` runs that one
computation in fp32 and leaves every linear layer to autocast, so block-sparse models train and predict in
bf16 or fp16 like any other. `attention_for_batch` applies it before every block-sparse forward pass, since
transformers builds a new attention module each time the type switches.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator

import torch

from finetune.data.batching import least_padding_batches
from finetune.families.big_bird import default_sparse_min_length, is_block_sparse, min_sparse_length
from finetune.families.big_bird import is_bigbird as _is_bigbird_config

__all__ = ["RULE_ATTRIBUTE", "attention_for_batch", "attention_for_config", "attention_for_length",
           "default_sparse_min_length", "is_bigbird", "is_block_sparse", "min_sparse_length", "plan_batches",
           "sparse_attention_in_fp32", "sparse_min_length"]

RULE_ATTRIBUTE = "sparse_attention_min_length"  # on the model config, so it is saved with the model


def is_bigbird(model: torch.nn.Module) -> bool:
    """Whether the model (or the config-only stand-in of an exported model) is a BigBird."""
    return _is_bigbird_config(getattr(model, "config", None))


def sparse_min_length(config, requested: int | None = None) -> int:
    """The threshold a BigBird config runs with: `requested`, else the config's saved rule, else the default.

    Raises ValueError naming the recipe field when the threshold is below what transformers allows.
    """
    shortest = min_sparse_length(config.block_size, config.num_random_blocks)
    value = requested if requested is not None else getattr(config, RULE_ATTRIBUTE, None)
    if value is None:
        return default_sparse_min_length(config.block_size, config.num_random_blocks)
    if value < shortest:
        raise ValueError(
            f"model.sparse_attention_min_length: {value} is below the {shortest} tokens block-sparse attention needs "
            f"with block_size {config.block_size} and num_random_blocks {config.num_random_blocks}; allowed: at least "
            f"{shortest} (= (5 + 2 x {config.num_random_blocks}) x {config.block_size} + 1)"
        )
    return value


def attention_for_length(configured: str, length: int, block_size: int, num_random_blocks: int,
                         min_length: int | None = None) -> str:
    """The attention type a batch of this padded length runs with.

    `min_length` is the rule's threshold (default: `default_sparse_min_length`); whatever it says, a
    length too short for block-sparse runs full attention.
    """
    shortest = min_sparse_length(block_size, num_random_blocks)
    threshold = max(min_length if min_length is not None else default_sparse_min_length(block_size, num_random_blocks),
                    shortest)
    if configured == "block_sparse" and length < threshold:
        return "original_full"
    return configured


def attention_for_config(config, length: int) -> str:
    """The attention type a batch of this padded length runs with, by the rule saved in a BigBird config."""
    return attention_for_length(config.attention_type, length, config.block_size, config.num_random_blocks,
                                sparse_min_length(config))


def plan_batches(lengths: list[int], batch_size: int, config=None, multiple: int = 1) -> list[list[int]]:
    """Indices of inputs, grouped into batches so no input's result depends on the others in its batch.

    Inputs go shortest first. For a block-sparse BigBird config, an input whose own padded length takes
    block-sparse attention shares a batch only with inputs of the same padded length, and inputs that take
    full attention never share one with them: otherwise a batch mate could change its attention type or
    the block layout it is computed with. Other models are cut into batches of at most `batch_size` where
    the padding saved pays for another pass (`least_padding_batches`; `multiple`: what the collator pads to).
    """
    if config is None or not is_block_sparse(config):
        return least_padding_batches(lengths, batch_size, multiple)
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    block = config.block_size

    def key(i: int) -> int | str:
        padded = -(-lengths[i] // block) * block
        return padded if attention_for_config(config, padded) == "block_sparse" else "full"

    batches: list[list[int]] = []
    for i in order:
        if batches and len(batches[-1]) < batch_size and key(batches[-1][0]) == key(i):
            batches[-1].append(i)
        else:
            batches.append([i])
    return batches


@contextmanager
def attention_for_batch(model: torch.nn.Module, input_ids: torch.Tensor, counts: dict[str, int] | None = None) -> Iterator[str]:
    """Run the enclosed forward pass with the attention type chosen for this batch, then restore the configured one.

    `counts` (optional) tallies how many batches ran with each type, so the choice is visible in logs.
    """
    if not is_bigbird(model):
        yield "default"
        return
    config = model.config
    configured = config.attention_type
    # The last axis is the sequence (multiple choice adds a choices axis before it).
    chosen = attention_for_config(config, input_ids.shape[-1])
    base = getattr(model, "base_model", None)  # BigBirdModel: the object whose attention type transformers flips
    if not hasattr(base, "set_attention_type"):
        # An exported model (config only): export refuses block_sparse, so it always runs full attention.
        yield chosen
        return
    base.set_attention_type(chosen)
    if chosen == "block_sparse":
        sparse_attention_in_fp32(model)  # switching made new attention modules
    if counts is not None:
        counts[chosen] = counts.get(chosen, 0) + 1
    try:
        yield chosen
    finally:
        base.set_attention_type(configured)


def _block_sparse_core_in_fp32(self, query, key, value, *rest: Any, **kwargs: Any):
    """transformers' `bigbird_block_sparse_attention`, computed in fp32 when autocast is on (and unchanged when not)."""
    original = type(self).bigbird_block_sparse_attention
    device = query.device.type
    if not torch.is_autocast_enabled(device):
        return original(self, query, key, value, *rest, **kwargs)

    def fp32(x):
        return x.float() if torch.is_tensor(x) and x.is_floating_point() else x

    with torch.autocast(device, enabled=False):
        return original(self, fp32(query), fp32(key), fp32(value), *map(fp32, rest),
                        **{k: fp32(v) for k, v in kwargs.items()})


def sparse_attention_in_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Make a BigBird's block-sparse attention core run in fp32 under autocast; other models are left as they are.

    Under bf16/fp16 autocast transformers' block-sparse attention fails ("scatter(): Expected self.dtype to be
    equal to src.dtype"): it rebuilds the full attention-probability matrix in the matmul's half-precision dtype
    from float32 softmax weights. Only that core is switched, per module instance (a bound method on the
    instance, so `copy.deepcopy` rebinds it to the copy and no other model in the process changes; each switch of
    attention type makes new modules, hence `attention_for_batch` calls this every time): the
    query/key/value projections, the feed-forward layers and the head, most of the arithmetic at 1,536 tokens,
    still run in half precision. Without autocast nothing changes.
    """
    if not is_bigbird(model):
        return model
    from transformers.models.big_bird.modeling_big_bird import BigBirdBlockSparseAttention

    for module in model.modules():
        if isinstance(module, BigBirdBlockSparseAttention):
            module.bigbird_block_sparse_attention = types.MethodType(_block_sparse_core_in_fp32, module)
    return model
