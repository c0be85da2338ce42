"""Every path that predicts follows the thread budget: file scoring, evaluate, the ONNX backend, and with a real busy
neighbour (issue 35: a file scored with torch's own pool ran 9x slower beside one busy process than with one thread)."""

from __future__ import annotations

import os
import time

import pytest
import torch

from finetune import threads
from finetune.cli import main as cli
from finetune.models.predictor import Predictor
from finetune.threads import ThreadBudget, process_budget, use_budget
from tests.conftest import busy_neighbour, threads_become, tiny_recipe, train_outside_test


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints, tmp_path_factory):
    root = tmp_path_factory.mktemp("threads")
    return train_outside_test(root, tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(root / "run"),
        tracking={"log_model": False, "system_metrics": False, "experiment": "threads"})).best_dir


@pytest.fixture
def fresh_budget(monkeypatch):
    """No process budget yet and no FINETUNE_THREADS; whatever a test sets is undone after it."""
    monkeypatch.delenv(threads.ENV, raising=False)
    previous = use_budget(None)
    before = torch.get_num_threads()
    yield
    made = use_budget(previous)
    if made is not None and made is not previous:
        made.close()
    torch.set_num_threads(before)


@pytest.fixture
def threads_per_batch(monkeypatch):
    """The torch thread count each PyTorch forward pass ran with, in order."""
    seen: list[int] = []
    forward = Predictor._forward

    def counting(self, batch):
        seen.append(torch.get_num_threads())
        return forward(self, batch)

    monkeypatch.setattr(Predictor, "_forward", counting)
    return seen


class CountingBudget(ThreadBudget):
    """A fixed budget whose count a test sets, counting how often it was applied."""

    def __init__(self, count: int):
        super().__init__(count)
        self.applied = 0

    def apply(self) -> int:
        self.applied += 1
        return super().apply()


def test_a_predictor_applies_its_budget_before_every_batch(model_dir, fresh_budget, threads_per_batch):
    predictor = Predictor.from_dir(model_dir, batch_size=2)
    own = CountingBudget(1)
    predictor.threads = own
    predictor.predict(["a fine film", "dull", "it was great", "bad", "ok"])
    assert own.applied == 3 and threads_per_batch == [1, 1, 1], (own.applied, threads_per_batch)

    # Without one of its own it follows the process's, which a training run or a server sets.
    process = CountingBudget(2)
    use_budget(process)
    predictor.threads = None
    predictor.predict(["a fine film", "dull"])
    assert process.applied == 1 and threads_per_batch[-1] == 2


def test_the_process_budget_is_made_once_from_the_environment(monkeypatch, fresh_budget):
    monkeypatch.setenv(threads.ENV, "1")
    budget = process_budget()
    assert budget.fixed == 1 and process_budget() is budget
    use_budget(None)
    monkeypatch.setenv(threads.ENV, "auto")
    assert process_budget().fixed is None


def test_predict_on_a_file_and_evaluate_take_threads_from_the_option(model_dir, fresh_budget, threads_per_batch,
                                                                     tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(threads.ENV, "2")  # the option wins over the environment, and is restored after the test
    source = tmp_path / "in.csv"
    source.write_text("sentence,label\na fine film,positive\ndull and long,negative\n", encoding="utf-8")
    assert cli(["predict", str(model_dir), "--input", str(source), "--output", str(tmp_path / "out.csv"),
                "--threads", "1"]) == 0
    assert os.environ[threads.ENV] == "1" and process_budget().fixed == 1
    assert threads_per_batch and set(threads_per_batch) == {1}, threads_per_batch

    use_budget(None)
    threads_per_batch.clear()
    assert cli(["evaluate", str(model_dir), str(source), "--no-log", "--threads", "1",
                "--output-dir", str(tmp_path / "evaluation")]) == 0
    assert threads_per_batch and set(threads_per_batch) == {1}, threads_per_batch


def test_a_thread_count_that_is_not_one_is_refused_naming_it(model_dir, fresh_budget, capsys):
    assert cli(["predict", str(model_dir), "a fine film", "--threads", "0"]) == 2
    assert "threads: '0' is not a thread count" in capsys.readouterr().err


def test_onnx_runs_each_batch_in_a_session_of_the_budget_s_size(model_dir, fresh_budget, tmp_path):
    pytest.importorskip("onnxruntime")
    from finetune.export.onnx import OnnxPredictor, export_onnx

    export_onnx(model_dir, tmp_path / "onnx", check=False)
    predictor = OnnxPredictor.from_dir(tmp_path / "onnx")
    texts = ["a fine film", "dull and long", "it was great"]
    budget = CountingBudget(2)
    predictor.threads = budget
    two = predictor.logits(texts, None)
    budget.threads = 1  # what the watcher does when a neighbour takes a core
    one = predictor.logits(texts, None)
    sizes = {count: session.get_session_options().intra_op_num_threads for count, session in predictor.sessions.items()}
    assert sizes == {2: 2, 1: 1}, sizes
    assert predictor.session is predictor.sessions[1]
    assert abs(two - one).max() < 1e-5


@pytest.mark.quiet_machine
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs: one for the neighbour")
def test_file_scoring_gives_a_core_to_a_real_busy_neighbour_and_takes_it_back(model_dir, fresh_budget, tmp_path,
                                                                              threads_per_batch):
    """`finetune predict --input` with the automatic budget, beside a busy loop pinned to one of its two CPUs: its
    batches run on one thread while the neighbour runs, and on two again once it is gone."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    budget = ThreadBudget(interval=0.25, cpus=cpus)
    use_budget(budget)
    time.sleep(1.5)  # a few samples of the machine as it is
    if budget.threads < 2:
        pytest.skip("other processes already keep a core busy here: no quiet core to take away")
    source = tmp_path / "in.csv"
    source.write_text("sentence\n" + "\n".join(f"review number {i} was fine" for i in range(64)) + "\n", encoding="utf-8")

    def score(name: str) -> list[int]:
        threads_per_batch.clear()
        assert cli(["predict", str(model_dir), "--input", str(source), "--output", str(tmp_path / name)]) == 0
        return list(threads_per_batch)

    with busy_neighbour(cpus[1]):
        assert threads_become(budget, 1), "a core kept busy by another process is not ours to use"
        crowded = score("crowded.csv")
    threads_become(budget, 2)
    quiet = score("quiet.csv")
    budget.close()
    assert crowded and set(crowded) == {1}, f"batches beside the busy neighbour ran with {crowded} threads"
    assert quiet and set(quiet) == {2}, f"batches after it left ran with {quiet} threads"
