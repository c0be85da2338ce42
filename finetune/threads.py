"""How many threads the math of this process may use, and keeping that right while other work comes and goes.

PyTorch sizes its OpenMP pool to every core of the machine and never looks again. On a machine shared with
anything busy that is the worst choice: every parallel region ends at a barrier that waits for the thread the
scheduler parked behind the neighbour, so a 2-thread server with one of two cores taken ran ~10x slower than with
one thread (issue 20). The budget here is the CPUs this process may run on (its affinity mask, narrowed by a
container's cgroup CPU quota), less the cores other processes keep busy on them, re-measured every second by a
daemon thread; the thread that runs the model applies it (OpenMP thread counts belong to the calling thread).

`FINETUNE_THREADS` (or `training.threads`, `--threads` of serve, predict, evaluate, label-issues and export) fixes
the count and stops the watching. Every model run follows one budget per process (`process_budget`): a training
run's or a server's once it has made one (`use_budget`), else one made on first use; so file scoring, evaluation,
the distillation teacher's pass and the export check are sized like training and serving (issue 35: a file scored
with torch's default pool ran 9x slower beside one busy process than with one thread).
No library does this: torch and onnxruntime only take a number, and os.process_cpu_count (3.13) sees affinity only.

OpenMP's wait policy stays libgomp's default (spin briefly, then sleep), deliberately: OMP_WAIT_POLICY=PASSIVE made
fp32 training 17% slower on a quiet 2-core machine, and under contention the budget drops to one thread, where
there is no team to wait for (measured in bench/shared_machine.py, BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

log = logging.getLogger(__name__)
ENV = "FINETUNE_THREADS"
HYSTERESIS = 0.2  # cores of free capacity beyond the rounding boundary before the pool changes size


def _niceness() -> int:
    try:
        return os.getpriority(os.PRIO_PROCESS, 0)
    except (AttributeError, OSError):
        return 0


def requested_threads(value: int | str | None = None) -> int | None:
    """A fixed thread count from an option or `FINETUNE_THREADS`; None means automatic (`auto` or unset)."""
    raw = value if value is not None else os.environ.get(ENV)
    if raw is None or str(raw).strip().lower() in ("", "auto"):
        return None
    try:
        threads = int(str(raw).strip())
    except ValueError:
        threads = 0
    if threads < 1:
        from finetune.errors import RecipeError

        raise RecipeError(f"threads: {raw!r} is not a thread count; give a whole number >= 1 or 'auto' "
                         f"(the option, or the {ENV} environment variable)")
    return threads


def affinity_cpus() -> list[int]:
    """The CPUs the scheduler may run this process on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), cgroup_file: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup and its parents, in CPUs (`cpu.max` in v2, `cfs_quota_us` in v1).

    This is what `docker run --cpus` and a Kubernetes CPU limit set; None when there is no limit.
    """
    limits: list[float] = []
    try:
        lines = cgroup_file.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        hierarchy, _, controllers_path = line.partition(":")
        controllers, _, path = controllers_path.partition(":")
        path = path.lstrip("/")
        if hierarchy == "0" and controllers == "":  # cgroup v2
            base, files = root, ("cpu.max",)
        elif "cpu" in controllers.split(","):  # cgroup v1
            base, files = root / controllers, ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            if not base.is_dir():
                base = root / "cpu"
        else:
            continue
        folder = base / path
        while True:
            limit = _read_quota(folder, files)
            if limit is not None:
                limits.append(limit)
            if folder == base or base not in folder.parents:
                break
            folder = folder.parent
    return min(limits) if limits else None


def _read_quota(folder: Path, files: tuple[str, ...]) -> float | None:
    try:
        if len(files) == 1:
            quota, _, period = (folder / files[0]).read_text().strip().partition(" ")
        else:
            quota, period = ((folder / name).read_text().strip() for name in files)
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or not period:
        return None
    try:
        return int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None


def cpu_budget(processes: int = 1) -> int:
    """Threads each of `processes` processes on this machine may use: affinity, then the cgroup quota, shared out."""
    cpus = len(affinity_cpus())
    quota = cgroup_cpu_limit()
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))  # a thread beyond the quota only gets throttled
    return max(1, cpus // max(1, processes))


class LoadSampler:
    """The cores other processes kept busy on this process's CPUs since the last sample (from /proc/stat)."""

    def __init__(self, cpus: list[int], stat: Path = Path("/proc/stat"), own: Path = Path("/proc/self/stat"),
                 count_niced: bool | None = None):
        self.cpus, self.stat, self.own = set(cpus), stat, own
        self.ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        # Time of niced processes (/proc/stat's second column) is not taken from us when we run at the default
        # priority: the scheduler gives them only what we leave. Counting it made a niced background job (a
        # test suite, a backup) halve our threads and hand it the core. A niced finetune counts it: those
        # processes may be its equals.
        self.count_niced = _niceness() > 0 if count_niced is None else count_niced
        self.last = self._read()

    def _read(self) -> tuple[float, float, float] | None:
        try:
            busy = total = 0.0
            for line in self.stat.read_text().splitlines():
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in self.cpus:
                    continue
                values = [float(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                total += sum(values)
                niced = 0.0 if self.count_niced else values[1]
                busy += sum(values) - idle - niced  # steal included: a hypervisor's share is not ours either
            own_fields = self.own.read_text().rsplit(")", 1)[1].split()
            ours = float(own_fields[11]) + float(own_fields[12])  # utime + stime of every thread, in ticks
        except (OSError, ValueError, IndexError):
            return None
        return busy, total, ours

    def others(self) -> float | None:
        """Cores' worth of CPU time taken by everything but this process since the last call."""
        now = self._read()
        last, self.last = self.last, now
        if now is None or last is None or not self.cpus:
            return None
        wall = (now[1] - last[1]) / len(self.cpus)  # ticks that passed on each CPU
        if wall <= 0:
            return None
        return max(0.0, ((now[0] - last[0]) - (now[2] - last[2])) / wall)


class ThreadBudget:
    """The intra-op thread count for the thread that runs the model: fixed, or following the machine's load.

    `apply()` is cheap (one comparison) and belongs right before each batch, in the thread that computes it.
    """

    def __init__(self, fixed: int | None = None, processes: int = 1, interval: float = 1.0, watch: bool = True,
                 cpus: list[int] | None = None):
        self.fixed, self.processes, self.interval = fixed, max(1, processes), interval
        self.cpus = cpus or affinity_cpus()
        self.limit = fixed or (min(cpu_budget(processes), max(1, len(self.cpus) // self.processes)))
        self.threads = self.limit
        self._smoothed: float | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if fixed is None and watch and self.limit > 1 and Path("/proc/stat").exists():
            self._sampler = LoadSampler(self.cpus)
            self._watcher = threading.Thread(target=self._watch, name="thread-budget", daemon=True)
            self._watcher.start()

    def describe(self) -> str:
        """For the run's header: `2 threads (fixed)`, `2 of 2 threads (automatic: ...)`."""
        if self.fixed is not None:
            return f"{self.fixed} thread{'s' if self.fixed > 1 else ''} (fixed)"
        return (f"{self.threads} of {self.limit} thread{'s' if self.limit > 1 else ''} "
                f"(automatic: fewer while other processes keep cores busy; {ENV}=N fixes it)")

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._adjust()

    def _adjust(self) -> None:
        others = self._sampler.others()
        if others is None:
            return
        # Smoothed over ~3 samples so one burst (a compile, a GC, a log rotation) does not halve the pool.
        self._smoothed = others if self._smoothed is None else 0.5 * self._smoothed + 0.5 * others
        free = (len(self.cpus) - self._smoothed) / self.processes
        # Rounded with a margin either side of the half-core boundary: a neighbour near half a core otherwise
        # flipped the pool between 1 and 2 threads every few seconds.
        if free > self.threads + 0.5 + HYSTERESIS:
            wanted = math.floor(free + 0.5 - HYSTERESIS)
        elif free < self.threads - 0.5 - HYSTERESIS:
            wanted = math.floor(free + 0.5 + HYSTERESIS)
        else:
            wanted = self.threads
        wanted = max(1, min(self.limit, wanted))
        if wanted != self.threads:
            log.info(f"threads: {self.threads} -> {wanted} (other processes keep {self._smoothed:.1f} cores busy)")
            self.threads = wanted

    def apply(self) -> int:
        """Set this thread's intra-op thread count to the budget if it changed; returns the count."""
        import torch

        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def close(self) -> None:
        """Stop watching the machine's load."""
        self._stop.set()


_budget: ThreadBudget | None = None
_budget_lock = threading.Lock()


def process_budget() -> ThreadBudget:
    """The budget a model run follows when it was not handed one: the one `use_budget` set (a training run's, a
    server's), else one made on first use from `FINETUNE_THREADS` (automatic when unset). One per process, so a
    process watches the machine's load with one thread however many models it loads."""
    global _budget
    with _budget_lock:
        if _budget is None:
            _budget = ThreadBudget(requested_threads())
        return _budget


def use_budget(budget: ThreadBudget | None) -> ThreadBudget | None:
    """Make `budget` the process's (None: the next `process_budget()` makes one anew); returns the one replaced, for
    the caller to put back when it is done."""
    global _budget
    with _budget_lock:
        previous, _budget = _budget, budget
        return previous
