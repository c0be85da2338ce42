"""One recipe on one machine trains the same way every time: every automatic decision is resolved once, recorded
as an MLflow param and said in the header; `mixed_precision: auto` reads a figure measured once in a quiet moment;
sweeps are seeded."""

from __future__ import annotations

import mlflow
import pytest
import torch

from finetune.config.recipe import Recipe
from finetune.training import preflight, speed, train
from finetune.training.report import RunReport
from tests.conftest import tiny_recipe

QUIET_BF16_FASTER = preflight.Bf16Measurement(median=1.5, low=1.4, high=1.6, others_busy=0.0)
BUSY_BF16_SLOWER = preflight.Bf16Measurement(median=0.6, low=0.4, high=0.9, others_busy=1.5)
BUSY_BF16_FASTER = preflight.Bf16Measurement(median=1.6, low=1.3, high=1.9, others_busy=1.5)


class _Header(RunReport):
    def __init__(self):
        self.start = None

    def training_starts(self, start):
        self.start = start


@pytest.fixture
def fresh_measurement(tmp_path, monkeypatch):
    """A CPU that computes bf16, no figure stored yet, and a new process's empty cache (restored afterwards)."""
    if torch.cuda.is_available():
        pytest.skip("auto on a GPU does not measure")
    monkeypatch.setattr(preflight, "cpu_computes_bf16", lambda: True)
    (tmp_path / "cache" / preflight.BF16_SPEEDUP_FILE).unlink(missing_ok=True)
    calls: list[preflight.Bf16Measurement] = []
    preflight.cpu_bf16_speedup.cache_clear()
    yield calls
    preflight.cpu_bf16_speedup.cache_clear()


def _measuring(monkeypatch, calls, measurement):
    monkeypatch.setattr(preflight, "measure_cpu_bf16_speedup", lambda: calls.append(measurement) or measurement)


def test_two_runs_of_one_recipe_resolve_the_same_precision_and_give_the_same_metrics(
        tiny_checkpoints, tmp_path, monkeypatch, fresh_measurement):
    """The first run measures in a quiet moment and keeps the figure; the second starts while the machine is busy
    (a measurement now would say bf16 is slow) and reads the kept figure: same precision, same params, same metrics."""
    from finetune.tracking.compare import compare_table

    calls = fresh_measurement
    runs, headers = [], []
    for index, measurement in enumerate((QUIET_BF16_FASTER, BUSY_BF16_SLOWER)):
        preflight.cpu_bf16_speedup.cache_clear()  # each run as a new process
        _measuring(monkeypatch, calls, measurement)
        header = _Header()
        recipe = Recipe.model_validate(tiny_recipe(
            tiny_checkpoints["bert"], output_dir=str(tmp_path / f"run-{index}"), training={"max_steps": 4, "batch_size": 8},
            tracking={"log_model": False, "system_metrics": False}))
        runs.append(train.main(recipe, report=header))
        headers.append(header.start)
    assert calls == [QUIET_BF16_FASTER], "measured once, in the quiet moment; the busy run read the kept figure"
    params = [mlflow.get_run(r.run_id).data.params for r in runs]
    resolved = [{k: v for k, v in p.items() if k.endswith(".resolved")} for p in params]
    assert resolved[0] == resolved[1]
    assert resolved[0]["training.mixed_precision.resolved"] == "bf16"
    assert resolved[0]["model.pad_to_multiple_of.resolved"] == "16"  # bf16 on a CPU pads to 16 (speed.pad_multiple)
    assert resolved[0]["model.pooling.resolved"] == "first"
    assert resolved[0]["training.threads.resolved"].startswith(("auto (up to ", "1", "2", "3", "4"))
    assert runs[0].best_metrics == runs[1].best_metrics
    for start in headers:
        assert start.precision.startswith("bf16 autocast") and "1.50x as fast as fp32" in start.precision
        assert "stored in" in start.precision
        assert any(n.startswith("resolved: threads ") and "pad_to_multiple_of 16" in n and "pooling first" in n
                   for n in start.notes)
    frame, _ = compare_table()
    assert list(frame["precision"]) == ["bf16", "bf16"]


def test_a_busy_machine_with_no_stored_figure_trains_fp32_says_so_and_keeps_nothing(tmp_path, monkeypatch,
                                                                                   fresh_measurement):
    """Even when the busy measurement reads bf16 as faster: a noisy figure never picks bf16, nor is it kept."""
    calls = fresh_measurement
    _measuring(monkeypatch, calls, BUSY_BF16_FASTER)
    assert preflight.choose_mixed_precision("auto") == "no"
    assert len(calls) == 2 and not (tmp_path / "cache" / preflight.BF16_SPEEDUP_FILE).exists()
    assert preflight.bf16_speedup_source() == preflight.BUSY
    assert "machine was busy" in preflight.precision_reason("auto")
    recipe = Recipe.model_validate(tiny_recipe("x", training={"mixed_precision": "auto"}))
    assert speed.describe_precision_decision(recipe).startswith("fp32 (auto: the machine was busy")
    preflight.cpu_bf16_speedup.cache_clear()  # the next run, in a quiet moment, measures and keeps it
    _measuring(monkeypatch, calls, QUIET_BF16_FASTER)
    assert preflight.choose_mixed_precision("auto") == "bf16"
    assert (tmp_path / "cache" / preflight.BF16_SPEEDUP_FILE).is_file()
    assert speed.describe_precision_decision(recipe).endswith("(auto: bf16 trains 1.50x as fast as fp32 on this CPU "
                                                     f"(measured now, stored in {tmp_path / 'cache' / preflight.BF16_SPEEDUP_FILE}))")


def test_a_precision_the_recipe_asks_for_is_said_as_asked():
    recipe = Recipe.model_validate(tiny_recipe("x", training={"mixed_precision": "no"}))
    assert speed.describe_precision_decision(recipe) == "fp32 (as the recipe asks)"


def test_two_sweeps_with_the_same_seed_propose_the_same_trials(tiny_checkpoints, tmp_path, monkeypatch):
    """Optuna's sampler is seeded from training.seed: the same search run twice tries the same values; another
    seed other values."""
    from types import SimpleNamespace

    from finetune.training import sweep
    from tests.conftest import write_recipe

    def fake_trial(path, overrides, trial_overrides, index, on_evaluate=None, report=None):
        recipe = sweep.load_recipe(path, [*overrides, *trial_overrides])
        score = -abs(recipe.training.learning_rate - 3e-4) - abs(recipe.training.warmup_ratio - 0.1)
        return recipe, SimpleNamespace(best_metrics={"accuracy": score}, run_id=None)

    monkeypatch.setattr(sweep, "_run_trial", fake_trial)
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_checkpoints["bert"]))
    search = ["training.learning_rate=logfloat:1e-5:1e-3", "training.warmup_ratio=float:0:0.3"]

    def proposed(seed: int) -> list[str]:
        said: list[str] = []
        sweep.sweep(str(path), [f"training.seed={seed}"], [], search, trials=6, say=said.append)
        return [line for line in said if line.startswith("trial ")]

    first, again, other = proposed(7), proposed(7), proposed(8)
    assert len(first) == 6 and first == again
    assert other != first
    parent = mlflow.search_runs(search_all_experiments=True, filter_string="tags.`finetune.sweep_parent` = 'true'")
    assert set(parent["params.sweep.sampler_seed"]) == {"7", "8"}


def test_workers_sharing_a_study_do_not_all_propose_the_same_trials():
    from finetune.training.sweep import sampler_seed

    assert sampler_seed(42, None) == 42
    assert sampler_seed(42, "sqlite:///optuna.db") != 42
