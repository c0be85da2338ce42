"""Command-line options several commands share."""

from __future__ import annotations

import argparse
import os

from finetune.threads import ENV as THREADS_ENV
from finetune.threads import requested_threads

THREADS_HELP = ("threads for the model's math, PyTorch's or ONNX Runtime's (default auto: the CPUs this process may "
                f"use, its affinity and container CPU quota, and fewer while other processes keep cores busy; or "
                f"{THREADS_ENV})")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    """`--threads N|auto` (see `apply_threads_option`)."""
    parser.add_argument("--threads", default=None, metavar="N|auto", help=THREADS_HELP)


def apply_threads_option(value: str | None) -> int | None:
    """Make `--threads` the process's setting, as `FINETUNE_THREADS` would be (every model this process runs reads
    it: finetune.threads.process_budget); returns the fixed count, None for automatic. Raises RecipeError for a
    value that is not a count."""
    if value is None:
        return requested_threads()
    threads = requested_threads(value)  # refuses anything but a count or auto, naming the option
    os.environ[THREADS_ENV] = str(threads) if threads is not None else "auto"
    return threads
