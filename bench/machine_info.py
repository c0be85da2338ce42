"""What machine a benchmark ran on, printed beside its figures (both bench scripts use it)."""

from __future__ import annotations

import os
import sys
from importlib import metadata
from typing import Sequence


def describe_machine(packages: Sequence[str]) -> dict:
    """CPU model, usable cores, torch threads, GPU (if any), Python and the given packages' versions."""
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": cores, "gpu": gpu, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
            **{p: metadata.version(p) for p in packages}}
