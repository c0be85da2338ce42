"""Shared fixtures: tiny random checkpoints of each tested encoder family, isolated MLflow stores and caches."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.tiny_models import build_tiny_checkpoints

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"
TEST_DATA = Path(__file__).resolve().parent / "data"
GOEMOTIONS_LABELS = (
    "admiration amusement anger annoyance approval caring confusion curiosity desire disappointment disapproval "
    "disgust embarrassment excitement fear gratitude grief joy love nervousness optimism pride realization relief "
    "remorse sadness surprise neutral"
).split()

CODAH_COLUMNS = ["category", "prompt", "ending0", "ending1", "ending2", "ending3", "label"]

# Nothing in the tests may reach the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_PICKLE_DESERIALIZATION", "false")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# A batch of other shapes changes how float32 matrix products are blocked (oneDNN picks kernels by shape and by
# CPU: AVX2, AVX-512, AMX; Intel and AMD), so the same input's outputs alone and batched differ in the sixth
# digit (seen: 5.5e-6 on logits of magnitude 3 on an Intel AMX machine, under 1e-6 on AMD Zen 4). 1e-4 of the
# values' magnitude is 20x above that, and far below what a batch mate leaking into an answer changes.
FLOAT32_BATCH_RTOL = 1e-4


def assert_equal_up_to_float32_rounding(got, want) -> None:
    """The same numbers up to the rounding a different batch shape causes in float32 kernels (see above)."""
    import numpy as np

    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    np.testing.assert_allclose(got, want, rtol=0, atol=FLOAT32_BATCH_RTOL * scale)


@pytest.fixture(scope="session", autouse=True)
def session_outside_the_checkout(tmp_path_factory, empty_store):
    """Module-scoped fixtures and subprocesses run outside the per-test isolation: give them a temporary working
    directory, MLflow store, caches and home too, so the suite never writes beside a user's real runs."""
    root = tmp_path_factory.mktemp("session")
    seed_store(root, empty_store)
    saved_cwd = os.getcwd()
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "FINETUNE_CACHE_DIR": str(root / "cache"),
           "HF_DATASETS_CACHE": str(root / "hf-datasets"), "MPLCONFIGDIR": str(root / "matplotlib")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.chdir(root)
    yield root
    os.chdir(saved_cwd)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints of each tested family, saved with save_pretrained (safetensors), by transformers
    model_type: bert, distilbert and big_bird share one small WordPiece vocabulary; roberta, xlm-roberta,
    deberta-v2, electra, modernbert and eurobert have tokenizers built like their hub ones (tests/tiny_models.py)."""
    return build_tiny_checkpoints(tmp_path_factory.mktemp("checkpoints"))


@pytest.fixture(scope="session")
def empty_store(tmp_path_factory) -> Path:
    """An MLflow SQLite store with its tables made and no experiment in it, to copy.

    Making the tables runs every MLflow schema migration, about a second each time; the suite makes over a hundred
    stores. A copy is what MLflow would make itself: it adds the Default experiment on first use, where that
    test runs."""
    import sqlite3

    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path = tmp_path_factory.mktemp("empty-store") / "mlflow.db"
    SqlAlchemyStore(f"sqlite:///{path}", str(path.parent / "artifacts"))._dispose_engine()
    with sqlite3.connect(path) as db:
        for table in ("experiment_tags", "experiments"):
            db.execute(f"DELETE FROM {table}")
    _EMPTY_STORE.append(path)  # for train_outside_test, which module-scoped fixtures call without fixtures
    return path


_EMPTY_STORE: list[Path] = []


def seed_store(folder: Path, template: Path) -> Path:
    """`folder`/mlflow.db as a copy of the empty store (see empty_store); returns its path."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copyfile(template, folder / "mlflow.db"))


@pytest.fixture(scope="session")
def bf16_speedup(session_outside_the_checkout) -> dict:
    """`mixed_precision: auto`'s start-up measurement, taken once for the session (in its cache folder): every test's
    subprocesses then read it instead of measuring again (~1 s each, more while the suite keeps the cores busy),
    and all of them decide on the same precision."""
    from finetune.training import preflight

    return {preflight.bf16_speedup_key(): preflight.cpu_bf16_speedup()}


def seed_bf16_speedup(cache: Path, entry: dict) -> None:
    from finetune.training import preflight

    cache.mkdir(parents=True, exist_ok=True)
    (cache / preflight.BF16_SPEEDUP_FILE).write_text(json.dumps(entry))


@pytest.fixture(autouse=True, scope="session")
def placeholder_figures():
    """Runs in this process save a small placeholder PNG instead of rendering their plots (learning curves,
    confusion matrix, reliability diagram): matplotlib's drawing took about a second of each tiny run, a quarter of
    its time, over a few hundred runs. The figure writers themselves are tested for real (`figures` marker:
    tests/test_artifacts.py, the run's artifacts in tests/test_tracking.py); commands run as subprocesses render."""
    from finetune.reports import artifacts

    real = artifacts.save_figure

    def placeholder(fig, path):
        from PIL import Image

        artifacts.plt.close(fig)
        Image.new("RGB", (160, 120), "white").save(path, format="PNG")
        return path

    artifacts.save_figure = placeholder
    _REAL_SAVE_FIGURE.append(real)
    yield
    artifacts.save_figure = real


@pytest.fixture(autouse=True)
def real_figures(request, monkeypatch):
    """Tests marked `figures` render the plots (see placeholder_figures)."""
    if request.node.get_closest_marker("figures") is not None:
        from finetune.reports import artifacts

        monkeypatch.setattr(artifacts, "save_figure", _REAL_SAVE_FIGURE[0])
    yield


_REAL_SAVE_FIGURE: list = []


@pytest.fixture(autouse=True)
def isolated_stores(request, tmp_path, monkeypatch):
    """Each test gets its own MLflow store, tokenisation cache and working directory. The store starts empty, as
    a copy (see empty_store), unless the test is marked no_store: it checks that a command creates none."""
    if request.node.get_closest_marker("no_store") is None:
        seed_store(tmp_path, request.getfixturevalue("empty_store"))
        seed_bf16_speedup(tmp_path / "cache", request.getfixturevalue("bf16_speedup"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    yield


@contextlib.contextmanager
def busy_neighbour(cpu: int, seconds: float = 60):
    """Another process keeping CPU `cpu` busy (a bounded busy loop) for the block, killed when it ends."""
    busy = subprocess.Popen([sys.executable, "-c", "import os, time\nos.sched_setaffinity(0, {%d})\n"
                             "end = time.monotonic() + %f\nwhile time.monotonic() < end: pass" % (cpu, seconds)])
    try:
        yield busy
    finally:
        busy.kill()
        busy.wait()


def threads_become(budget, count: int, timeout: float = 15) -> bool:
    """Wait until a ThreadBudget's count is `count` (True), or the time is up (False)."""
    import time

    deadline = time.monotonic() + timeout
    while budget.threads != count and time.monotonic() < deadline:
        time.sleep(0.1)
    return budget.threads == count


def wait_for_http(url: str, proc, timeout: float = 120, interval: float = 0.3) -> bool:
    """Poll `url` until it answers 200 (True), or the process exits or the time is up (False)."""
    import time

    import httpx

    deadline = time.time() + timeout
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            return False
        time.sleep(interval)


def train_outside_test(root: Path, recipe: dict):
    """Train a recipe dict with its MLflow store and cache under `root` (for module-scoped fixtures, which run
    outside the per-test isolation); returns the RunResult."""
    from finetune.training import train
    from finetune.config.recipe import Recipe

    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "FINETUNE_CACHE_DIR")}
    if _EMPTY_STORE and not (root / "mlflow.db").exists():
        seed_store(root, _EMPTY_STORE[0])
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["FINETUNE_CACHE_DIR"] = str(root / "cache")
    try:
        return train.main(Recipe.model_validate(recipe))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def first_rows(path: Path, n: int, target: Path) -> Path:
    """The header and first n rows of a TSV, written to target (to train and evaluate on the same examples)."""
    with open(path, encoding="utf-8") as f:
        lines = [next(f) for _ in range(n + 1)]
    target.write_text("".join(lines), encoding="utf-8")
    return target


def write_recipe(path: Path, recipe: dict, command: str | None = None) -> Path:
    """Write a recipe dict as YAML (with the command line on top, as shipped recipes have)."""
    text = yaml.safe_dump(recipe, sort_keys=False)
    path.write_text((f"# {command}\n" if command else "") + text)
    return path


def tiny_recipe(checkpoint: Path, kind: str = "classification", **sections) -> dict:
    """A fast recipe on the shipped samples for a tiny checkpoint; sections override key by key."""
    data = {
        "classification": {
            "files": {"train": str(DATA / "sst2" / "train.tsv"), "validation": str(DATA / "sst2" / "dev.tsv")},
            "quoting": "none", "text_column": "sentence", "label_column": "label",
            "label_names": ["negative", "positive"], "max_train_samples": 256, "max_eval_samples": 64,
        },
        "pair": {
            "files": {"train": str(TEST_DATA / "mrpc_sample.tsv")},
            "quoting": "none", "text_column": "sentence1", "text_pair_column": "sentence2",
            "label_column": "label", "validation_size": 0.25,
        },
        "regression": {
            "files": {"train": str(DATA / "sst2" / "train.tsv"), "validation": str(DATA / "sst2" / "dev.tsv")},
            "quoting": "none", "text_column": "sentence", "label_column": "label",
            "max_train_samples": 256, "max_eval_samples": 64,
        },
        "multi_label": {
            "files": {"train": str(TEST_DATA / "goemotions_sample.tsv")},
            "quoting": "none", "text_column": "text", "label_column": "labels",
            "label_names": GOEMOTIONS_LABELS, "validation_size": 0.25,
        },
        "token_classification": {
            "files": {"train": str(TEST_DATA / "ner_sample.conll")},
            "text_column": "tokens", "label_column": "ner_tags", "validation_size": 0.25,
        },
        "question_answering": {
            "files": {"train": str(TEST_DATA / "squad_sample.json")}, "format": "squad", "validation_size": 0.25,
        },
        "multiple_choice": {
            "files": {"train": str(TEST_DATA / "codah_sample.tsv")}, "quoting": "none",
            "column_names": CODAH_COLUMNS, "text_column": "prompt", "label_column": "label",
            "choice_columns": CODAH_COLUMNS[2:6], "validation_size": 0.25,
        },
    }
    task_type = "classification" if kind == "pair" else kind
    recipe = {
        "name": f"tiny-{kind}",
        "model": {"checkpoint": str(checkpoint), "max_length": 64},
        "data": data[kind],
        "task": {"type": task_type},
        "training": {"max_steps": 6, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3, "logging_steps": 2},
        "tracking": {"log_model": False},
    }
    if kind == "question_answering":  # windows of 64 tokens overlapping by 16: every context needs several
        recipe["task"]["doc_stride"] = 16
    for section, values in sections.items():
        if isinstance(values, dict) and isinstance(recipe.get(section), dict):
            recipe[section] = {**recipe[section], **values}
        else:
            recipe[section] = values
    return recipe


# Property tests are reproducible: every run (and CI) tries the same derandomised examples, and no example
# database is kept, so a clone that failed once does not keep replaying a stored example after the fix. Bugs
# the tests found are pinned as explicit @example()s. FINETUNE_HYPOTHESIS_PROFILE=explore searches afresh.
def _hypothesis_profiles() -> None:
    import atexit
    import shutil
    import tempfile

    from hypothesis import settings
    from hypothesis.configuration import set_hypothesis_home_dir

    # Even without an example database, hypothesis caches what it learns (e.g. constants/) in `.hypothesis/` of
    # the directory pytest started in, the checkout: a temporary folder instead, gone when the process ends.
    home = tempfile.mkdtemp(prefix="finetune-hypothesis-")
    atexit.register(shutil.rmtree, home, True)
    set_hypothesis_home_dir(home)

    settings.register_profile("reproducible", derandomize=True, database=None, print_blob=True)
    settings.register_profile("explore", database=None, print_blob=True)
    settings.load_profile(os.environ.get("FINETUNE_HYPOTHESIS_PROFILE", "reproducible"))


_hypothesis_profiles()

# Files the suite must never leave in the checkout (what `git status` would show as new).
_IGNORED_LEFTOVERS = (".venv/", "__pycache__/", ".pytest_cache/", ".egg-info/")


def _untracked(root: Path) -> set[str]:
    import subprocess

    try:
        out = subprocess.run(["git", "ls-files", "--others", "--directory", "--no-empty-directory"],
                             cwd=root, capture_output=True, text=True, timeout=60).stdout
        ignored = subprocess.run(["git", "ls-files", "--others", "--ignored", "--exclude-standard", "--directory"],
                                 cwd=root, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {p for p in (out + ignored).splitlines() if not any(part in p for part in _IGNORED_LEFTOVERS)}


def pytest_sessionstart(session):
    session.config._checkout_before = _untracked(ROOT) if (ROOT / ".git").exists() else None


def pytest_sessionfinish(session, exitstatus):
    before = getattr(session.config, "_checkout_before", None)
    if before is None:
        return
    added = sorted(_untracked(ROOT) - before)
    if added:
        print(f"\nthe test suite wrote into the checkout (tests must write only to temporary folders): {added}")
        session.exitstatus = 1


def load_bench(script: str, monkeypatch):
    """bench/<script>.py as a module, `bench_<script>`, for the test's duration."""
    import importlib.util
    import sys

    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # the scripts import their siblings
    name = f"bench_{script}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def run_bench(script: str, argv: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`python bench/<script>.py *argv`, but its main(argv) in this process: a smoke run then skips the seconds a
    new process spends importing torch and transformers. Returns the exit code, stdout and stderr."""
    import sys

    module = load_bench(script, monkeypatch)
    capsys.readouterr()
    try:
        code = module.main(argv)
    except SystemExit as stop:  # argparse's refusals, and scripts that exit with a message
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# The modules that take longest (a trained MiniLM, the parity runs of every family, the compose topology, the
# benchmarks' smoke runs) start first: with two workers (scripts/test.sh) a long module that starts last runs
# alone at the end while the other worker idles (the quickstart alone was the suite's last 2.5 minutes).
LONG_MODULES_FIRST = ("test_transfer.py", "test_parity.py", "test_deploy.py", "test_bench_train.py",
                      "test_bench_pretrain_distill.py", "test_faults.py", "test_bench_memory.py",
                      "test_docs.py", "test_gpu_check.py", "test_contrastive.py", "test_family_features.py",
                      "test_bench_serve.py", "test_bench_adapters.py", "test_bench_serve_ceiling.py",
                      "test_mixed_adapters.py")


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONG_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
