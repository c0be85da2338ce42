"""Checks that run before any data is loaded or any MLflow run starts."""

from __future__ import annotations

import dataclasses
import functools
import statistics
import shutil
import time
from pathlib import Path
from typing import Callable

import torch

from finetune.config.recipe import Recipe
from finetune.errors import RecipeError
from finetune.families.support import recipe_problems
from finetune.models import pretrained
from finetune.models.layers import check_freeze
from finetune.models.starting import Start
from finetune.tasks import Task, get_task
from finetune.training.outputs import check_output_dir
from finetune.training.start import resolve_start
from finetune.tracking.tracker import tracking_uri


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX), as oneDNN sees it.

    Only then is bf16 faster than fp32 on a CPU (measured here: 1.1x at 16 tokens, 1.9x at 256 per
    training step, BENCHMARKS.md); elsewhere torch emulates it and it is slower.
    """
    try:
        return torch.backends.mkldnn.is_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a private op: absent from some builds
        return False


# bf16 autocast trains on a CPU only when it is clearly faster than fp32 there (below, a 10% margin for noise).
BF16_MIN_SPEEDUP = 1.1


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster bf16 autocast trains than fp32 on this CPU, as `auto` decides on it.

    Measured once per CPU model and torch version, in a quiet moment, and kept in the cache folder
    (FINETUNE_CACHE_DIR, default ~/.cache/finetune), so every later run of any recipe on this machine reads the same
    figure and resolves `auto` the same way. A measurement counts only when it is clear (`Bf16Measurement.clear`:
    other processes left the cores alone and the quartiles agree); one taken while the machine is busy is never
    kept, and counts as no faster than fp32 (at most 1.0), so that run trains in fp32, which is right on every CPU,
    and says so (`bf16_speedup_source`); the next run measures again. A busy moment once made `auto` pick bf16 on a
    CPU where it trains at 0.54x of fp32, and a figure taken afresh at each start made one recipe train in fp32 once
    and in bf16 the next time (BENCHMARKS.md).
    """
    import json
    import os

    from finetune.data.features import cache_home

    key, path = bf16_speedup_key(), cache_home() / BF16_SPEEDUP_FILE
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), (int, float)):
        _SOURCE["speedup"] = f"stored in {path}"
        return float(known[key])
    measured = measure_cpu_bf16_speedup()
    if not measured.clear:
        measured = measure_cpu_bf16_speedup()  # once more: a busy moment rarely lasts two measurements
    if not measured.clear:
        _SOURCE["speedup"] = BUSY
        return min(measured.low, 1.0)
    _SOURCE["speedup"] = f"measured now, stored in {path}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps({**(known if isinstance(known, dict) else {}), key: measured.median}))
        os.replace(tmp, path)
    except OSError:  # a read-only home still trains; it measures again next time
        _SOURCE["speedup"] = f"measured now, not stored ({path} is not writable)"
    return measured.median


BUSY = "busy"
_SOURCE: dict[str, str] = {}
"""Where this process's `cpu_bf16_speedup` came from (a stored figure, a new measurement, or BUSY), for the header."""


def bf16_speedup_source() -> str | None:
    """Where `cpu_bf16_speedup`'s figure came from in this process: `stored in PATH`, `measured now, stored in PATH`,
    BUSY (the machine was busy, nothing was measured that could be trusted), or None (not asked yet)."""
    return _SOURCE.get("speedup")


BF16_SPEEDUP_FILE = "cpu-bf16-speedup.json"


def bf16_speedup_key() -> str:
    """The entry of this CPU model and torch version in the cache folder's BF16_SPEEDUP_FILE."""
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in _cpuinfo() if line.startswith("model name")), platform.processor())
    return f"{cpu} | torch {torch.__version__}"


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@dataclasses.dataclass(frozen=True)
class Bf16Measurement:
    """Ratios fp32 time / bf16 time of interleaved trial pairs, summarised."""

    median: float
    low: float  # lower quartile
    high: float  # upper quartile
    others_busy: float | None  # cores' worth of CPU other processes used meanwhile, where /proc/stat says

    @property
    def clear(self) -> bool:
        """The machine was quiet and the quartiles agree on which side of BF16_MIN_SPEEDUP the speed-up lies."""
        quiet = self.others_busy is None or self.others_busy < 0.25
        return quiet and (self.low >= BF16_MIN_SPEEDUP or self.high < BF16_MIN_SPEEDUP)


def _linear_trial() -> Callable[[bool], float]:
    """One timed forward and backward of a MiniLM feed-forward layer on 32 x 32 tokens, fp32 or bf16 autocast.

    A private generator leaves the global random state alone.
    """
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 384, generator=generator, requires_grad=True)
    w = torch.randn(1536, 384, generator=generator, requires_grad=True)

    def trial(bf16: bool) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            started = time.perf_counter()
            torch.nn.functional.linear(x, w).sum().backward()
            return time.perf_counter() - started

    return trial


def measure_cpu_bf16_speedup(pairs: int = 11, trial: Callable[[bool], float] | None = None,
                             sampler=None) -> Bf16Measurement:
    """How many times faster a bf16-autocast linear layer runs forward and backward than fp32, measured now (~1 s).

    The CPU flags do not say it: with AVX512-BF16, bf16 training was 1.36x faster on an AMD Zen 4 and 0.54-0.74x as
    fast on an Intel Xeon without AMX (BENCHMARKS.md), so `auto` measures what this CPU does. The trials alternate
    (fp32, bf16, then bf16, fp32, ...) and each pair gives one ratio, so a neighbour that is busy for part of the
    measurement slows both sides of the pairs it overlaps instead of one precision; the median ignores the pairs
    it split. Timing all fp32 trials before all bf16 ones is what misjudged a busy moment.
    """
    from finetune.threads import LoadSampler, affinity_cpus

    trial = trial or _linear_trial()
    for bf16 in (False, True, False, True):  # warm-ups: kernel set-up for both
        trial(bf16)
    sampler = sampler or LoadSampler(affinity_cpus())
    ratios = []
    for i in range(pairs):
        order = (False, True) if i % 2 == 0 else (True, False)
        seconds = {bf16: trial(bf16) for bf16 in order}
        ratios.append(seconds[False] / max(seconds[True], 1e-9))
    others = sampler.others()
    q1, q2, q3 = statistics.quantiles(ratios, n=4)
    return Bf16Measurement(median=q2, low=q1, high=q3, others_busy=others)


def choose_mixed_precision(requested: str) -> str:
    """Resolve `auto` and refuse half precision the hardware cannot run.

    `auto` on a CPU: bf16 when the CPU computes it natively and a measurement says it is faster here
    (`cpu_bf16_speedup`), else fp32.
    """
    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "bf16" if cpu_computes_bf16() and cpu_bf16_speedup() >= BF16_MIN_SPEEDUP else "no"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise RecipeError("training.mixed_precision: fp16 needs a CUDA GPU and none is visible; allowed here: auto, no, bf16")
    return requested


def precision_reason(requested: str) -> str:
    """Why `choose_mixed_precision(requested)` chose what it did, in a few words for the run's header."""
    if requested != "auto":
        return "as the recipe asks"
    if torch.cuda.is_available():
        return "auto: this GPU computes bf16" if torch.cuda.is_bf16_supported() else "auto: this GPU lacks bf16"
    if not cpu_computes_bf16():
        return "auto: this CPU does not compute bf16 natively"
    speedup, source = cpu_bf16_speedup(), bf16_speedup_source()
    if source == BUSY:
        return ("auto: the machine was busy, so bf16's speed here could not be measured; fp32 for this run, "
                "measured again next run")
    return f"auto: bf16 trains {speedup:.2f}x as fast as fp32 on this CPU ({source or 'measured'})"


def preflight(recipe: Recipe, overwrite: bool = False) -> tuple[Task, Start]:
    """Everything checkable before loading data: task, checkpoint (or the fine-tuned model it names), model and
    freezing settings, a writable output folder that is new, empty or finetune's own (`overwrite`: any folder, see
    `finetune.training.outputs`)."""
    task = get_task(recipe.task.type)
    start = resolve_start(recipe.model.checkpoint, recipe.model.revision, recipe.model.allow_pickle,
                          tracking_uri(recipe))
    resolved = start.resolved
    config = pretrained.load_config(resolved, recipe.model.trust_remote_code)
    problems = recipe_problems(config, recipe, task) + check_freeze(recipe.training.freeze, config)
    if problems:
        raise RecipeError("the recipe does not fit the checkpoint:\n" + "\n".join(f"  - {p}" for p in problems))
    choose_mixed_precision(recipe.training.mixed_precision)
    out = Path(recipe.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RecipeError(f"output_dir: cannot write to {out.resolve()}: {e.strerror}") from None
    check_output_dir(out, overwrite)  # before the probe: nothing is written into a folder finetune did not make
    try:
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise RecipeError(f"output_dir: cannot write to {out.resolve()}: {e.strerror}") from None
    check_free_space(out, resolved.path, recipe.training.save_total_limit)
    return task, start


def check_free_space(out: Path, checkpoint: Path, keep: int) -> None:
    """Refuse to start when the disk cannot hold the checkpoints the run will write.

    Each training-state checkpoint holds the weights and AdamW's two moments (about 3x the weights);
    `keep` of them exist at once, plus one being written, plus the best model.
    """
    weights = sum(p.stat().st_size for p in Path(checkpoint).glob("*.safetensors")) or \
        sum(p.stat().st_size for p in Path(checkpoint).glob("*.bin"))
    needed = weights * (3 * (keep + 1) + 1)
    free = shutil.disk_usage(out).free
    if free < needed:
        raise RecipeError(
            f"output_dir: {out.resolve()} has {free / 2**30:.1f} GiB free, but this run needs about "
            f"{needed / 2**30:.1f} GiB for {keep + 1} checkpoints and the best model; free some space, "
            "choose another output_dir, or lower training.save_total_limit"
        )
