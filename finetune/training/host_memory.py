"""Giving freed host memory back to the system while training on a CPU.

PyTorch's CPU allocator goes through the C library's malloc. glibc keeps the pages of freed blocks for reuse and
returns them to the system only from the top of its heap, so a training step that frees gigabytes of activations
leaves a little more resident every time: `recipes/quickstart-mlm.yaml` climbed from 2.4 to 4.9 GiB over its first
48 steps (the masked-LM head's logits change size with every batch's count of masked tokens), and the long-document
pretraining reached 11.8 GiB after 77 minutes. `malloc_trim(0)` returns every whole free page, wherever it lies.
After every step it cost 20% of the step time here (the next step faults the pages in again); every 10 steps it
cost nothing measurable and the peak fell to 3.4 GiB (BENCHMARKS.md, "Memory").

Written by hand because no library does it for a training loop: PyTorch leaves host memory to the C library, and
glibc's own setting for it (a fixed `MALLOC_MMAP_THRESHOLD_`) must be in the environment before the process starts,
and either saved little (32 MB: 4.5 GiB) or cost 11-26% of the training time (16 and 4 MB).
"""

from __future__ import annotations

import ctypes
from typing import Callable

TRIM_EVERY = 10
"""Optimizer steps between two returns of freed memory."""


def malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


class FreedMemory:
    """Returns the pages of freed blocks to the system every TRIM_EVERY optimizer steps (a no-op without glibc)."""

    def __init__(self) -> None:
        self.trim = malloc_trim()

    def after_step(self, step: int) -> None:
        if self.trim is not None and step % TRIM_EVERY == 0:
            self.trim(0)
