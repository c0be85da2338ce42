"""Nothing lost, nothing foreign deleted, nothing half-written trusted: output folders, checkpoints, model folders."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from finetune.cli import main as cli
from finetune.config.recipe import MAX_SEED, Recipe
from finetune.errors import CheckpointError, RecipeError
from finetune.models.checksums import mark_staging, write_manifest
from finetune.models.modeling import MANIFEST_FILE, ModelInfo, build_model, recover_model_dir, save_model_dir
from finetune.models.pretrained import resolve_checkpoint
from finetune.tasks import get_task
from finetune.training import outputs, train
from finetune.training import state as training_state
from tests.conftest import tiny_recipe, write_recipe

TEXT = "a gripping, beautiful film"


# ---------------------------------------------------------------------------------------------
# model folders (issue 16 item 3)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """A model folder as training saves it (untrained head: only loading is tested here)."""
    from finetune.config.recipe import ModelSection

    checkpoint = str(tiny_checkpoints["bert"])
    torch.manual_seed(0)
    model, tokenizer = build_model(resolve_checkpoint(checkpoint), ModelSection(checkpoint=checkpoint),
                                   get_task("classification"), ["negative", "positive"])
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False, max_length=64)
    return save_model_dir(tmp_path_factory.mktemp("saved") / "best", model, tokenizer, info, "name: tiny\n")


def _as_mlflow_data(folder: Path) -> Path:
    """The layout of a logged MLflow model's data folder, with the checksums MLflow logging records."""
    from finetune.tracking.mlflow_model import _record_checksums

    root = folder.with_name(folder.name + "-mlflow")
    (root / "model").mkdir(parents=True)
    (root / "components" / "tokenizer").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(folder / name, root / "model" / name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(folder / name, root / "components" / "tokenizer" / name)
    shutil.copy(folder / "finetune.json", root / "finetune.json")
    _record_checksums(root)
    return root


def _load_folder(folder: Path):
    from finetune.models.predictor import Predictor

    return Predictor.from_dir(folder)


def _load_onnx(folder: Path):
    from finetune.export.onnx import OnnxPredictor

    (folder / "model.onnx").write_bytes(b"not reached: the folder is checked first")
    return OnnxPredictor.from_dir(folder)


def _load_mlflow(folder: Path):
    from finetune.tracking.mlflow_model import predictor_from_data

    return predictor_from_data(folder)


def _load_served(folder: Path):
    from serving.loading import load_model

    return load_model(str(folder)).predictor


LOADERS = {"Predictor.from_dir": _load_folder, "OnnxPredictor.from_dir": _load_onnx,
           "mlflow predictor_from_data": _load_mlflow, "finetune serve": _load_served}


def _parts(root: Path, mlflow: bool) -> tuple[Path, Path]:
    """(weights folder, tokenizer folder) of a model folder in either layout."""
    return (root / "model", root / "components" / "tokenizer") if mlflow else (root, root)


def _drop_tokenizer(weights: Path, tokenizer: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tokenizer / name).unlink()


def _drop_weights(weights: Path, tokenizer: Path) -> None:
    (weights / "model.safetensors").unlink()


def _truncate_weights(weights: Path, tokenizer: Path) -> None:
    path = weights / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_a_weight(weights: Path, tokenizer: Path) -> None:
    path = weights / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF  # inside the tensor data: the header, so safetensors itself, sees nothing wrong
    path.write_bytes(bytes(data))


def _grow_vocab_in_config(weights: Path, tokenizer: Path) -> None:
    config = json.loads((weights / "config.json").read_text())
    config["vocab_size"] += 1000
    (weights / "config.json").write_text(json.dumps(config))


CORRUPTIONS = {
    "tokenizer missing": (_drop_tokenizer, "tokenizer.json"),
    "weights missing": (_drop_weights, "model.safetensors"),
    "weights truncated": (_truncate_weights, "model.safetensors"),
    "a weight changed": (_flip_a_weight, "model.safetensors does not match the sha256 checksum"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_every_loader_refuses_a_damaged_model_folder_naming_the_file(saved_model, tmp_path, loader, corruption):
    folder = shutil.copytree(saved_model, tmp_path / "best")
    mlflow = loader == "mlflow predictor_from_data"
    if mlflow:
        folder = _as_mlflow_data(folder)
    damage, named = CORRUPTIONS[corruption]
    damage(*_parts(folder, mlflow))
    with pytest.raises(CheckpointError, match=named):
        LOADERS[loader](folder)


@pytest.mark.parametrize("loader", LOADERS)
def test_a_tokenizer_of_another_vocabulary_is_refused(saved_model, tmp_path, loader):
    folder = shutil.copytree(saved_model, tmp_path / "best")
    mlflow = loader == "mlflow predictor_from_data"
    if mlflow:
        folder = _as_mlflow_data(folder)
    weights, _ = _parts(folder, mlflow)
    _grow_vocab_in_config(weights, weights)
    # The checksums agree (as if saved that way), so it is the vocabulary check that refuses.
    listed = json.loads((folder / MANIFEST_FILE).read_text())["files"]
    write_manifest(folder, list(listed), MANIFEST_FILE)
    with pytest.raises(CheckpointError, match=r"the tokenizer has \d+ tokens but config.json's vocab_size is \d+"):
        LOADERS[loader](folder)


def _as_saved_before_checksums(folder: Path) -> Path:
    """A folder as a finetune before checksums wrote it: no manifest, and finetune.json does not name one."""
    (folder / MANIFEST_FILE).unlink()
    meta = json.loads((folder / "finetune.json").read_text())
    meta.pop("manifest")
    (folder / "finetune.json").write_text(json.dumps(meta))
    return folder


def test_folders_saved_before_checksums_load_and_are_still_checked(saved_model, tmp_path, caplog):
    old = _as_saved_before_checksums(shutil.copytree(saved_model, tmp_path / "old"))
    with caplog.at_level("WARNING", logger="finetune"):
        assert _load_folder(old).predict([TEXT])[0]["label"] in {"negative", "positive"}  # not verified, but served
    assert f"has no {MANIFEST_FILE}" in caplog.text and "not verified" in caplog.text, "said, not silent"

    no_tokenizer = shutil.copytree(old, tmp_path / "no-tokenizer")
    _drop_tokenizer(no_tokenizer, no_tokenizer)
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        _load_folder(no_tokenizer)
    truncated = shutil.copytree(old, tmp_path / "truncated")
    _truncate_weights(truncated, truncated)
    with pytest.raises(CheckpointError, match=r"model.safetensors: not readable safetensors"):
        _load_folder(truncated)
    vocab = shutil.copytree(old, tmp_path / "vocab")
    _grow_vocab_in_config(vocab, vocab)
    with pytest.raises(CheckpointError, match="vocab_size"):
        _load_folder(vocab)


def test_predict_names_the_bad_file_instead_of_a_traceback(saved_model, tmp_path, capsys):
    folder = shutil.copytree(saved_model, tmp_path / "best")
    _drop_tokenizer(folder, folder)
    assert cli(["predict", str(folder), TEXT]) == 2
    assert "tokenizer.json is missing" in capsys.readouterr().err


def test_a_corrupt_onnx_file_is_named(saved_model, tmp_path):
    from finetune.export.onnx import OnnxPredictor

    folder = shutil.copytree(saved_model, tmp_path / "export")
    (folder / "model.onnx").write_bytes(b"\x08garbage")
    with pytest.raises(CheckpointError, match=r"model.onnx: ONNX Runtime cannot load it"):
        OnnxPredictor.from_dir(folder)


def test_model_folders_get_the_users_usual_permissions(saved_model, tmp_path):
    mask = os.umask(0o022)
    os.umask(mask)
    assert (saved_model.stat().st_mode & 0o777) == 0o777 & ~mask  # not mkdtemp's 0700


# ---------------------------------------------------------------------------------------------
# checkpoints (issue 16 item 2)
# ---------------------------------------------------------------------------------------------


def _save_checkpoints(out: Path, steps=(2, 4), recipe_hash: str = "recipe-a", keep: int = 5) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator()
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 4)).sum().backward()
    optimizer.step()  # so the optimizer has state tensors to save
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    for step in steps:
        counters = asdict(train.RunState(step=step, recipe_hash=recipe_hash, run_id="0123abcd"))
        training_state.save_training_state(accelerator, model, optimizer, scheduler, counters, out, keep=keep)


def _break_json(path: Path) -> None:
    (path / training_state.STATE_FILE).write_text('{"step": 4, "recipe_ha')


def _truncate(path: Path) -> None:
    target = path / "model.safetensors"
    target.write_bytes(target.read_bytes()[:40])


def _lose_optimizer(path: Path) -> None:
    (path / "optimizer.safetensors").unlink()


DAMAGES = {"truncated safetensors": (_truncate, "model.safetensors"),
           "broken JSON": (_break_json, "trainer_state.json"),
           "optimizer file missing": (_lose_optimizer, "optimizer.safetensors is missing")}


@pytest.mark.parametrize("manifest", [True, False], ids=["with manifest", "written before manifests"])
@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_named_and_the_previous_one_resumed(tmp_path, damage, manifest):
    _save_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step-4"
    if not manifest:
        for path in training_state.step_dirs(tmp_path):
            (path / training_state.MANIFEST_FILE).unlink()
    spoil, named = DAMAGES[damage]
    spoil(newest)
    said: list[str] = []
    found = training_state.find_resumable(tmp_path, "recipe-a", False, said.append)
    assert found == tmp_path / "checkpoints" / "step-2"
    assert len(said) == 1 and "step-4 is damaged" in said[0] and named in said[0], said
    assert not newest.exists()


def test_interrupted_checkpoint_saves_are_finished_or_removed(tmp_path):
    _save_checkpoints(tmp_path, steps=(2, 4))
    root = tmp_path / "checkpoints"
    os.replace(root / "step-4", root / ".step-4.tmp")  # killed after its manifest, before the rename
    (root / ".step-6.tmp").mkdir()  # killed mid-write (a save marks its folder first)
    mark_staging(root / ".step-6.tmp", ".step-6.tmp")
    (root / ".step-6.tmp" / "rng-0.json").write_text("{}")
    (root / ".step-8.tmp").mkdir()  # the same name, but not a folder finetune made: left alone
    (root / ".step-8.tmp" / "rng-0.json").write_text("mine")
    said: list[str] = []
    assert training_state.find_resumable(tmp_path, "recipe-a", False, said.append) == root / "step-4"
    assert sorted(p.name for p in root.iterdir()) == [".step-8.tmp", "step-2", "step-4"]
    assert any("kept as step-4" in s for s in said) and any(".step-6.tmp" in s and "removed" in s for s in said)
    assert any(".step-8.tmp alone" in s for s in said) and (root / ".step-8.tmp" / "rng-0.json").read_text() == "mine"


def test_checkpoints_of_a_changed_recipe_are_kept_aside_and_nothing_foreign_is_deleted(tmp_path):
    _save_checkpoints(tmp_path)
    root = tmp_path / "checkpoints"
    (root / "notes.txt").write_text("mine")
    said: list[str] = []
    assert training_state.find_resumable(tmp_path, "recipe-b", False, said.append) is None
    aside = root / "superseded" / "0123abcd"
    assert sorted(p.name for p in aside.iterdir()) == ["step-2", "step-4"]
    assert "another recipe" in said[0] and str(aside) in said[0]
    assert (root / "notes.txt").read_text() == "mine"
    assert training_state.checkpoint_problem(aside / "step-4") is None  # intact: it can be moved back and resumed


def test_a_finished_run_drops_its_checkpoints_unless_the_recipe_keeps_them(tmp_path):
    for keep, left in ((False, []), (True, ["step-2", "step-4"])):
        out = tmp_path / str(keep)
        _save_checkpoints(out)
        training_state.mark_finished(out, keep_checkpoints=keep)
        assert [p.name for p in training_state.step_dirs(out)] == left
        assert (out / "checkpoints" / training_state.FINISHED_FILE).is_file()


@pytest.mark.no_store
def test_a_crash_between_the_two_renames_of_best_is_recovered(saved_model, tmp_path):
    from finetune.models.integrity import check_model_folder

    best = tmp_path / "best"
    # save_model_dir had moved the old best aside (marked) and not yet renamed the new one (marked) in.
    for name in (".best-old", ".best-new"):
        mark_staging(shutil.copytree(saved_model, tmp_path / name), "best")
    (tmp_path / ".best-k2j3h4x1").mkdir()  # not finetune's (an earlier version's mkdtemp, or the user's): kept
    done = recover_model_dir(best)
    assert check_model_folder(best).info.task == "classification"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best-k2j3h4x1", "best"]
    assert sorted(p.name for p in best.iterdir()) == sorted(p.name for p in saved_model.iterdir()), "marker gone"
    assert any("interrupted between its two renames" in d for d in done)
    # Killed after the second rename: the new best is in place, the old one is still aside.
    mark_staging(shutil.copytree(saved_model, tmp_path / ".best-old"), "best")
    recover_model_dir(best)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".best-k2j3h4x1", "best"]


# ---------------------------------------------------------------------------------------------
# a real run: foreign folders, --overwrite, damage, recovery, keep_checkpoints (issue 16 item 1, issue 15)
# ---------------------------------------------------------------------------------------------


def _recipe(tiny_checkpoints, out: Path, **training) -> Recipe:
    return Recipe.model_validate(tiny_recipe(
        tiny_checkpoints["bert"], output_dir=str(out),
        training={"max_steps": 6, "batch_size": 8, "eval_strategy": "steps", "eval_steps": 2, **training},
        tracking={"system_metrics": False}))


@pytest.mark.no_store
def test_foreign_output_folders_are_refused_unless_overwrite(tiny_checkpoints, tmp_path, capsys):
    theirs = tmp_path / "theirs"
    (theirs / "checkpoints").mkdir(parents=True)
    (theirs / "checkpoints" / "notes.txt").write_text("mine")
    (theirs / "best").mkdir()
    (theirs / "best" / "weights.bin").write_text("mine")
    only_a_file = tmp_path / "only-a-file"
    only_a_file.mkdir()
    (only_a_file / "data.csv").write_text("a,b\n")
    for folder in (theirs, only_a_file):
        with pytest.raises(RecipeError, match=r"output_dir: .* finetune did not write .* --overwrite"):
            train.main(_recipe(tiny_checkpoints, folder))
    assert not (tmp_path / "mlflow.db").exists(), "refused before anything started"
    assert (theirs / "best" / "weights.bin").read_text() == "mine"
    assert sorted(p.name for p in only_a_file.iterdir()) == ["data.csv"]

    recipe_file = write_recipe(tmp_path / "r.yaml", _recipe(tiny_checkpoints, theirs).model_dump(mode="json"))
    assert cli(["validate", str(recipe_file)]) == 1  # validate says what run would refuse
    assert "finetune did not write" in capsys.readouterr().out

    # --overwrite adopts it; the largest seed validate accepts also trains.
    result = train.main(_recipe(tiny_checkpoints, theirs, seed=MAX_SEED), overwrite=True)
    assert outputs.read_marker(theirs)["state"] == "finished"
    assert outputs.read_marker(theirs)["mlflow_run_id"] == result.run_id
    assert (theirs / "checkpoints" / "notes.txt").read_text() == "mine", "only step-N folders are deleted"
    assert training_state.step_dirs(theirs) == [], "a finished run keeps no resume checkpoints by default"
    assert (theirs / "best" / "model.safetensors").is_file()
    outputs.check_output_dir(theirs, overwrite=False)  # now finetune's own: no flag needed


class Interrupted(Exception):
    pass


def test_a_killed_run_with_a_damaged_checkpoint_and_a_half_swapped_best_resumes(tiny_checkpoints, tmp_path, capsys):
    out = tmp_path / "out"
    recipe = _recipe(tiny_checkpoints, out, keep_checkpoints=True, save_total_limit=3)

    def crash(step: int, metrics: dict) -> bool:
        if step == 4:
            raise Interrupted
        return False

    with pytest.raises(Interrupted):
        train.main(recipe, hooks=train.TrainingHooks(on_evaluate=crash))
    assert outputs.describe(out).state == "resumable from step-4"
    _truncate(out / "checkpoints" / "step-4")
    # And as if killed in the middle of saving best/ (a save marks the old folder it moves aside, and its new one).
    mark_staging(out / "best", "best")
    os.replace(out / "best", out / ".best-old")
    (out / ".best-new").mkdir()
    mark_staging(out / ".best-new", "best")
    capsys.readouterr()

    resumed = train.main(recipe)
    err = capsys.readouterr().err
    assert resumed.resumed_from == 2, "the newest intact checkpoint"
    assert "step-4 is damaged (model.safetensors" in err and "restored" in err and ".best-new" in err
    assert sorted(p.name for p in out.iterdir()) == [".finetune-run.json", "best", "checkpoints", "recipe.yaml"]
    assert [p.name for p in training_state.step_dirs(out)] == ["step-2", "step-4", "step-6"]  # kept, as asked
    assert outputs.describe(out).state == "finished (checkpoints kept)"


# ---------------------------------------------------------------------------------------------
# finetune runs / finetune clean (issue 15)
# ---------------------------------------------------------------------------------------------


def _runs_tree(saved_model: Path, root: Path) -> dict[str, Path]:
    done, paused, theirs = root / "done", root / "paused", root / "theirs"
    for folder in (done, paused):
        outputs.claim(folder, folder.name, "h")
        shutil.copytree(saved_model, folder / "best")
    outputs.update_marker(done, state="finished", mlflow_run_id="f" * 32)
    (done / "checkpoints").mkdir()
    (done / "checkpoints" / training_state.FINISHED_FILE).write_text("finished\n")
    outputs.update_marker(paused, state="failed")
    _save_checkpoints(paused, steps=(4,))
    (paused / "notes.txt").write_text("mine")
    theirs.mkdir()
    (theirs / "data.txt").write_text("mine")
    return {"done": done, "paused": paused, "theirs": theirs}


def test_runs_lists_output_folders_and_clean_deletes_only_what_finetune_wrote(saved_model, tmp_path, capsys):
    folders = _runs_tree(saved_model, tmp_path / "runs")
    capsys.readouterr()
    assert cli(["runs", "--format", "json"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert {k: r["state"] for k, r in rows.items()} == {
        "done": "finished", "paused": "resumable from step-4", "theirs": "foreign"}
    assert rows["done"]["mlflow_run"] == "f" * 32 and rows["paused"]["size_mb"] > 0

    before = sorted(str(p) for p in (tmp_path / "runs").rglob("*"))
    assert cli(["clean", "--dry-run", "runs/done", "runs/paused"]) == 0
    assert "would delete runs/paused/checkpoints/step-4" in capsys.readouterr().out
    assert cli(["clean", "runs/theirs"]) == 2
    assert "finetune did not make it" in capsys.readouterr().err
    assert sorted(str(p) for p in (tmp_path / "runs").rglob("*")) == before, "nothing deleted"

    assert cli(["clean", "--resume-checkpoints", "runs/paused"]) == 0
    assert training_state.step_dirs(folders["paused"]) == [] and (folders["paused"] / "best").is_dir()
    assert outputs.describe(folders["paused"]).state == "unfinished, nothing to resume"

    assert cli(["clean", "runs"]) == 0  # every output folder finetune made under runs/
    assert not folders["done"].exists()
    assert sorted(p.name for p in folders["paused"].iterdir()) == [".finetune-run.json", "notes.txt"]
    assert (folders["theirs"] / "data.txt").read_text() == "mine"
    assert "left alone (finetune did not write them): notes.txt" in capsys.readouterr().out


def test_clean_refuses_a_run_in_progress(tmp_path):
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        folder = tmp_path / "live"
        outputs.claim(folder, "live", "h")
        marker = outputs.read_marker(folder)
        outputs.update_marker(folder, pid=sleeper.pid, pid_started=outputs._process_started(sleeper.pid))
        assert outputs.describe(folder).state == f"running (pid {sleeper.pid})"
        assert cli(["clean", str(folder)]) == 2
        assert outputs.read_marker(folder)["created"] == marker["created"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert outputs.describe(folder).state != f"running (pid {sleeper.pid})"


def test_saved_counters_from_another_version_resume_or_are_refused_by_name(tmp_path, caplog):
    from finetune.errors import CheckpointError
    from finetune.training.train import RunState

    with caplog.at_level("WARNING", logger="finetune"):
        state = RunState.from_saved({"step": 40, "epoch": 1, "tokens_seen": 9000}, tmp_path / "checkpoint-40")
    assert (state.step, state.epoch) == (40, 1)
    assert "ignoring training counters this version does not know: tokens_seen" in caplog.text
    with pytest.raises(CheckpointError, match=r"cannot resume from .*checkpoint-40: its .* holds list"):
        RunState.from_saved([40, 1], tmp_path / "checkpoint-40")
