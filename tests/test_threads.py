"""The thread budget: the CPUs a process may use (affinity, cgroup quota), and fewer while others keep cores busy."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from finetune import threads
from finetune.errors import RecipeError
from tests.conftest import busy_neighbour, threads_become
from finetune.threads import LoadSampler, ThreadBudget, cgroup_cpu_limit, cpu_budget, requested_threads


def test_a_fixed_count_comes_from_the_option_or_the_environment(monkeypatch):
    monkeypatch.delenv(threads.ENV, raising=False)
    assert requested_threads() is None and requested_threads("auto") is None
    assert requested_threads("3") == 3 and requested_threads(2) == 2
    monkeypatch.setenv(threads.ENV, "1")
    assert requested_threads() == 1
    assert requested_threads("auto") is None, "the option wins over the environment"
    for bad in ("0", "-2", "two", "1.5"):
        with pytest.raises(RecipeError, match=rf"threads: '{bad}' is not a thread count; give a whole number >= 1 or 'auto'"):
            requested_threads(bad)


def test_cgroup_v2_quota_of_the_process_or_a_parent(tmp_path):
    (tmp_path / "cgroup").write_text("0::/kubepods/pod1/container\n")
    root = tmp_path / "fs"
    (root / "kubepods" / "pod1" / "container").mkdir(parents=True)
    (root / "kubepods" / "pod1" / "container" / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(root, tmp_path / "cgroup") is None
    (root / "kubepods" / "pod1" / "cpu.max").write_text("150000 100000\n")  # the pod's limit: 1.5 CPUs
    assert cgroup_cpu_limit(root, tmp_path / "cgroup") == 1.5


def test_cgroup_v1_quota(tmp_path):
    (tmp_path / "cgroup").write_text("4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    folder = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") == 3.0
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path / "fs", tmp_path / "cgroup") is None


def test_the_budget_is_affinity_narrowed_by_the_quota_and_shared_by_processes(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: list(range(8)))
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert cpu_budget() == 8 and cpu_budget(processes=2) == 4 and cpu_budget(processes=16) == 1
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)  # docker run --cpus 2.5
    assert cpu_budget() == 2
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.5)
    assert cpu_budget() == 1


def _stat(tmp_path: Path, cpus: dict[int, tuple[int, int]], own_ticks: int, niced: dict[int, int] | None = None
          ) -> tuple[Path, Path]:
    """A /proc/stat with (busy, idle) ticks per CPU (and niced ticks) and a /proc/self/stat with this process's ticks."""
    niced = niced or {}
    lines = ["cpu  0 0 0 0 0 0 0 0 0 0"] + [f"cpu{n} {busy} {niced.get(n, 0)} 0 {idle} 0 0 0 0 0 0"
                                           for n, (busy, idle) in cpus.items()]
    (tmp_path / "stat").write_text("\n".join(lines) + "\n")
    fields = ["S"] + ["0"] * 10 + [str(own_ticks), "0"] + ["0"] * 30
    (tmp_path / "self").write_text("123 (python (odd) name) " + " ".join(fields) + "\n")
    return tmp_path / "stat", tmp_path / "self"


def test_the_sampler_counts_other_processes_on_our_cpus_only(tmp_path):
    stat, own = _stat(tmp_path, {0: (0, 0), 1: (0, 0), 2: (0, 0)}, own_ticks=0)
    sampler = LoadSampler([0, 1], stat, own)
    # 100 ticks pass on each CPU: CPU 0 fully busy, CPU 1 half, CPU 2 (not ours) fully; we used 50 of them.
    _stat(tmp_path, {0: (100, 0), 1: (50, 50), 2: (100, 0)}, own_ticks=50)
    assert sampler.others() == pytest.approx(1.0)
    _stat(tmp_path, {0: (200, 0), 1: (150, 50), 2: (200, 0)}, own_ticks=250)
    assert sampler.others() == pytest.approx(0.0), "all the busy time was ours"


def test_niced_processes_count_only_against_a_niced_finetune(tmp_path):
    # CPU 0: 40 ticks of a process at default priority and 60 of a niced one; CPU 1 idle; none of it ours.
    for count_niced, expected in ((False, 0.4), (True, 1.0)):
        stat, own = _stat(tmp_path, {0: (0, 0), 1: (0, 0)}, own_ticks=0)
        sampler = LoadSampler([0, 1], stat, own, count_niced=count_niced)
        _stat(tmp_path, {0: (40, 0), 1: (0, 100)}, own_ticks=0, niced={0: 60})
        assert sampler.others() == pytest.approx(expected), f"count_niced={count_niced}"
    assert LoadSampler([0], stat, own).count_niced is (os.getpriority(os.PRIO_PROCESS, 0) > 0)


def test_a_neighbour_near_half_a_core_does_not_flip_the_pool(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1])
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    budget = ThreadBudget(watch=False)
    budget._sampler = _Sampler([0.45, 0.55, 0.4, 0.6, 0.5, 0.55] * 3 + [0.9] * 4 + [0.45, 0.6, 0.4, 0.55] * 3 + [0.0] * 4)
    seen = []
    for _ in range(18 + 4 + 12 + 4):
        budget._adjust()
        seen.append(budget.threads)
    assert seen[:18] == [2] * 18, f"a load wavering around half a core keeps the pool as it is: {seen}"
    assert seen[21] == 1, f"a core taken takes a thread: {seen}"
    assert seen[22:34] == [1] * 12, f"and the wavering load does not give it back: {seen}"
    assert seen[-1] == 2, f"an idle machine does: {seen}"


class _Sampler:
    def __init__(self, values):
        self.values = list(values)

    def others(self):
        return self.values.pop(0) if self.values else 0.0


def test_the_budget_follows_the_load_and_a_fixed_count_does_not(monkeypatch):
    monkeypatch.setattr(threads, "affinity_cpus", lambda: [0, 1, 2, 3])
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    budget = ThreadBudget(watch=False)
    assert budget.threads == 4 and "automatic" in budget.describe()
    budget._sampler = _Sampler([2.0, 2.0, 2.0, 0.0, 0.0, 0.0, 0.0])
    seen = []
    for _ in range(7):
        budget._adjust()
        seen.append(budget.threads)
    assert seen[2] == 2, f"two cores busy elsewhere leave two threads: {seen}"
    assert seen[-1] == 4, f"and all four come back when they are free: {seen}"
    assert ThreadBudget(fixed=3).describe() == "3 threads (fixed)"


def test_apply_sets_the_calling_thread_s_count():
    before = torch.get_num_threads()
    budget = ThreadBudget(fixed=1)
    try:
        assert budget.apply() == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


@pytest.mark.quiet_machine
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the neighbour")
def test_a_real_busy_neighbour_takes_a_thread_away_and_gives_it_back():
    cpus = sorted(os.sched_getaffinity(0))[:2]
    pin = cpus[1]
    budget = ThreadBudget(interval=0.25, cpus=cpus)
    time.sleep(1.5)  # a few samples of the machine as it is
    if budget.threads < 2:
        budget.close()
        pytest.skip("other processes already keep a core busy here: no quiet core to take away")
    with busy_neighbour(pin, 30):
        assert threads_become(budget, 1), "a core kept busy by another process is not ours to use"
    back = threads_become(budget, 2)
    budget.close()
    assert back, "the core is back once the neighbour is gone"
