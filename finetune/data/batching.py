"""Length-grouped batching: batches of examples of similar length, in random order.

With dynamic padding a batch costs as much as its longest example times its size. Drawn at random,
most of a batch of short sentences is padding (SST-2: 13 real tokens on average, 40 padded in a
random batch of 32). Grouping by length inside random mega-batches removes most of that padding
while each batch is still a random draw from its region of the data.

transformers' `get_length_grouped_indices` does the grouping; what this module adds is the batch
order. Its `LengthGroupedSampler` yields each mega-batch's batches longest first, so every epoch
would run as 50 repetitions of a long-to-short length curriculum; here the full batches are shuffled
across the epoch (the one partial batch, if any, stays last so the DataLoader's batching lines up).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler
from transformers.trainer_pt_utils import get_length_grouped_indices

MEGA_BATCH_MULT = 50  # transformers' default: a mega-batch of 50 batches is sorted by length at a time


class LengthGroupedShuffledSampler(Sampler[int]):
    """Indices such that every `batch_size` consecutive ones have similar lengths, batches in random order.

    The order depends only on `generator`'s state when iteration starts, so seeding it (with seed +
    epoch) before each epoch gives every process the same order and a resumed run the same batches:
    `accelerator.skip_first_batches` then skips exactly the batches already trained on.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, generator: torch.Generator,
                 mega_batch_mult: int = MEGA_BATCH_MULT):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        # Named `generator` so Accelerate synchronises it across processes, as it does a RandomSampler's.
        self.generator = generator
        self.mega_batch_mult = mega_batch_mult

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        if not self.lengths:
            return iter(())
        mult = max(1, min(self.mega_batch_mult, len(self.lengths) // (self.batch_size * 4)))
        grouped = get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=mult,
                                             generator=self.generator)
        batches = [grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)]
        partial = [batches.pop()] if len(batches[-1]) < self.batch_size else []
        order = torch.randperm(len(batches), generator=self.generator).tolist()
        return iter([i for b in order for i in batches[b]] + [i for batch in partial for i in batch])


def example_lengths(dataset, column: str = "input_ids") -> list[int]:
    """Padded length each example of a tokenised dataset needs (multiple choice: its longest choice)."""
    if hasattr(dataset, "with_format"):  # a datasets.Dataset: Arrow computes flat lengths (67k rows in 1 ms, not 1 s)
        import pyarrow as pa
        import pyarrow.compute as pc

        values = dataset.with_format("arrow")[column]
        if not pa.types.is_list(values.type.value_type):
            return pc.list_value_length(values).to_pylist()
        rows = dataset[column]
    else:
        rows = [example[column] for example in dataset]
    return [max(map(len, row), default=0) if row and isinstance(row[0], list) else len(row) for row in rows]


def train_loader(dataset, cfg, collator, generator: torch.Generator, num_processes: int = 1) -> DataLoader:
    """The training DataLoader of a recipe's `training` section: length-grouped or plain random batches.

    Either way the order comes from `generator` alone (the loop seeds it with seed + epoch), which is what
    makes resuming and several processes see the same batches. Groups are one global batch (batch_size x
    processes; Accelerate deals consecutive batches to the processes), so N processes train on the same
    examples at each step as one process with an N times larger batch.
    """
    # The DataLoader takes the generator in both cases: it draws its workers' base seed from it, which would
    # otherwise come from (and shift) the global RNG that dropout uses, and a resumed run would drift.
    if cfg.group_by_length:
        group = cfg.batch_size * num_processes
        order = {"sampler": LengthGroupedShuffledSampler(example_lengths(dataset), group, generator)}
    else:
        order = {"shuffle": True}
    # Pinned host memory lets a CUDA copy run asynchronously (see finetune.training.speed); workers build the next
    # batches while the GPU trains on this one, and stay alive between epochs.
    return DataLoader(dataset, batch_size=cfg.batch_size, collate_fn=collator, num_workers=cfg.num_workers,
                      pin_memory=torch.cuda.is_available(), persistent_workers=cfg.num_workers > 0, generator=generator, **order)


def eval_loader(dataset, collator, batch_size: int) -> DataLoader:
    """Evaluation batches in data order (post-processing maps outputs back to rows by position)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)


# What one forward pass costs beyond its tokens, counted in tokens: measured on the offline MiniLM on 2 CPU cores
# (batches of 16 SST-2 sentences cut by this rule ran 1.17x faster than each batch padded to its longest with a
# figure of 64 to 128; 16 cut so finely that the small passes lost it again). bench/serve.py measures it served.
PASS_OVERHEAD_TOKENS = 96


def least_padding_batches(lengths: Sequence[int], batch_size: int, multiple: int = 1,
                          overhead: int = PASS_OVERHEAD_TOKENS) -> list[list[int]]:
    """Indices of inputs cut into batches of at most `batch_size`, shortest first, where cutting pays: each batch
    costs `overhead` tokens plus its size times its longest input (rounded up to `multiple`, as the collator pads),
    and the cuts minimise the total. A request's inputs of 5 and 60 tokens then run in two passes instead of one
    padded to 60 for all; inputs of one length still run in full batches.

    Written here because it is a dozen lines of dynamic programming (over sorted lengths, each batch a run of them),
    and no batching library chooses cuts for an in-process model's padding."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    padded = np.array([-(-max(lengths[i], 1) // multiple) * multiple for i in order], dtype=np.int64)
    best = np.zeros(len(order) + 1, dtype=np.int64)  # best[i]: least cost of the i shortest inputs
    cut = np.zeros(len(order) + 1, dtype=np.int64)  # where the last batch of those i starts
    for end in range(1, len(order) + 1):
        starts = np.arange(max(0, end - batch_size), end)
        costs = best[starts] + overhead + (end - starts) * padded[end - 1]
        pick = int(np.argmin(costs))  # the first of equal costs: the largest batch
        best[end], cut[end] = costs[pick], starts[pick]
    batches: list[list[int]] = []
    end = len(order)
    while end:
        batches.append(order[cut[end]:end])
        end = int(cut[end])
    return batches[::-1]
