"""Issue 34's surprises, each pinned: a rerun keeps the champion's model folder, saved files follow the umask,
`KEY=none` means the value named none, an output folder given as a model names its best/, finetune's own export
and evaluation folders are finetune's to `runs` and `clean`, Ctrl-C in file scoring is one line, and the suite
cleans up after itself."""

from __future__ import annotations

import csv
import json
import os
import stat
from pathlib import Path

import pytest
import yaml

from finetune.cli import main
from finetune.config.recipe import parse_override
from finetune.files import OUTPUT_MARKER, publish_files, staging_folder
from finetune.training import outputs
from tests.conftest import ROOT, tiny_recipe


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_checkpoints):
    from transformers import AutoModelForSequenceClassification

    from finetune.models.modeling import load_tokenizer

    source = tiny_checkpoints["bert"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    return model, load_tokenizer(source), source


def _save(model_and_tokenizer, target: Path) -> Path:
    from finetune.models.modeling import ModelInfo, save_model_dir

    model, tokenizer, source = model_and_tokenizer
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False, max_length=64)
    return save_model_dir(target, model, tokenizer, info, yaml.safe_dump(tiny_recipe(source)))


# --- files follow the umask ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mask", [0o022, 0o002])
def test_every_file_of_a_saved_model_folder_follows_the_umask(model_and_tokenizer, tmp_path, mask):
    previous = os.umask(mask)
    try:
        folder = _save(model_and_tokenizer, tmp_path / "best")
    finally:
        os.umask(previous)
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert {"model.safetensors", "config.json", "finetune.json", "checksums.json"} <= names
    assert any(n.startswith("tokenizer") or n == "vocab.txt" for n in names)
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in files}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes  # safetensors alone would leave 0o600


# --- KEY=none ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("item, value", [
    ("data.quoting=none", "none"), ("training.freeze=none", "none"), ("task.calibration=none", "none"),
    ("training.freeze=None", "none"),
    ("training.max_grad_norm=none", None), ("training.max_grad_norm=null", None), ("data.quoting=null", None),
])
def test_none_is_the_value_named_none_where_the_field_allows_it_and_null_elsewhere(item, value):
    assert parse_override(item)[1] == value


def test_a_none_override_validates_in_a_whole_recipe(tmp_path, tiny_checkpoints):
    from finetune.config.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe(tiny_checkpoints["bert"])))
    recipe = load_recipe(path, ["data.quoting=none", "task.calibration=none", "training.freeze=none"])
    assert (recipe.data.quoting, recipe.training.freeze) == ("none", "none")


# --- an output folder given as a model -----------------------------------------------------------------------------

def test_a_run_folder_given_as_a_model_names_its_best(model_and_tokenizer, tmp_path, capsys):
    run = tmp_path / "runs" / "quickstart"
    _save(model_and_tokenizer, run / "best")
    outputs.claim(run, "quickstart", "x")
    capsys.readouterr()
    assert main(["predict", str(run), "fine"]) == 2
    err = capsys.readouterr().err
    assert f"did you mean {(run / 'best').as_posix()}?" in err and err.count("\n") == 1
    empty = tmp_path / "runs" / "unfinished"
    outputs.claim(empty, "unfinished", "x")
    assert main(["export", str(empty), str(tmp_path / "onnx"), "--no-check"]) == 2
    assert "has no best/ model yet" in capsys.readouterr().err
    assert main(["predict", str(run / "best"), "fine"]) == 0  # the model itself still loads


# --- finetune's own export and evaluation folders -------------------------------------------------------------------

def _published(folder: Path, kind: str, files: dict[str, str]) -> Path:
    stage = staging_folder(folder)
    for name, text in files.items():
        (stage / name).parent.mkdir(parents=True, exist_ok=True)
        (stage / name).write_text(text)
    publish_files(stage, folder, kind, "test")
    return folder


def test_runs_and_clean_know_finetunes_export_and_evaluation_folders(tmp_path, capsys):
    runs = tmp_path / "runs"
    evaluation = _published(runs / "quickstart-eval", "evaluation", {"metrics.json": "{}", "plots/cm.png": "x"})
    export = _published(runs / "quickstart-onnx", "export", {"model.onnx": "x", "finetune.json": "{}"})
    (evaluation / "notes.txt").write_text("the user's")  # never listed in the marker: never deleted
    (runs / "mine").mkdir()
    (runs / "mine" / "data.csv").write_text("a,b\n")
    (runs / "converted").mkdir()
    (runs / "converted" / "conversion.json").write_text(json.dumps({"to": "bigbird"}))
    (runs / "converted" / "config.json").write_text("{}")

    states = {Path(f.path).name: f.state for f in outputs.list_runs(runs)}
    assert states == {"quickstart-eval": "evaluation", "quickstart-onnx": "export", "mine": "foreign",
                      "converted": "conversion"}

    assert main(["clean", str(export), str(evaluation)]) == 0
    out = capsys.readouterr().out
    assert not export.exists()  # everything in it was finetune's
    assert sorted(p.relative_to(evaluation).as_posix() for p in evaluation.rglob("*")) == ["notes.txt"]
    assert "left alone (finetune did not write them): notes.txt" in out
    assert main(["clean", str(runs / "converted")]) == 2
    assert "a converted checkpoint" in capsys.readouterr().err
    assert (runs / "converted" / "config.json").exists() and (runs / "mine" / "data.csv").exists()


def test_clean_of_an_export_folder_never_follows_a_listed_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    export = _published(tmp_path / "onnx", "export", {"model.onnx": "x"})
    (export / "model.onnx").unlink()
    (export / "model.onnx").symlink_to(victim)
    outputs.clean(export)
    assert victim.read_text() == "precious" and (export / "model.onnx").is_symlink()
    assert not (export / OUTPUT_MARKER).exists()


def test_resume_only_clean_leaves_export_folders_whole(tmp_path):
    export = _published(tmp_path / "onnx", "export", {"model.onnx": "x"})
    outputs.clean(export, resume_only=True)
    assert (export / "model.onnx").exists() and (export / OUTPUT_MARKER).exists()


# --- Ctrl-C in file scoring -------------------------------------------------------------------------------------------

def test_ctrl_c_while_scoring_a_file_is_one_line_and_exit_130(model_and_tokenizer, tmp_path, monkeypatch, capsys):
    import finetune.evaluation.scoring as scoring

    model = _save(model_and_tokenizer, tmp_path / "model")
    source = tmp_path / "in.csv"
    with open(source, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["sentence"])
        writer.writerows([[f"a fine film {i}"] for i in range(30)])
    real, calls = scoring.answer_chunk, {"n": 0}

    def stop_after_one(*args, **kwargs):
        if calls["n"] == 1:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "answer_chunk", stop_after_one)
    argv = ["predict", str(model), "--input", str(source), "--output", str(tmp_path / "out.csv"), "--chunk-rows", "10"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    assert err.splitlines()[-1] == ("interrupted: 10 rows written (toward " + str(tmp_path / "out.csv")
                                    + "); run the same command again to resume")
    monkeypatch.setattr(scoring, "answer_chunk", real)
    assert main(argv) == 0
    assert "resumed at row 10" in capsys.readouterr().out


# --- a rerun and the champion's model folder ----------------------------------------------------------------------------

def test_a_rerun_moves_the_champions_best_aside_and_says_so(tiny_checkpoints, tmp_path, capsys):
    from finetune.config.recipe import Recipe
    from finetune.tracking.sources import locate
    from finetune.training import train

    out = tmp_path / "runs" / "champ"
    recipe = tiny_recipe(tiny_checkpoints["bert"], name="champ", output_dir=str(out),
                         training={"max_steps": 2, "batch_size": 16, "eval_batch_size": 32, "learning_rate": 1e-3,
                                   "logging_steps": 2},
                         tracking={"log_model": True, "register_as": "champ-model"})
    first = train.main(Recipe.model_validate(recipe))
    weights = (out / "best" / "model.safetensors").read_bytes()
    capsys.readouterr()

    outputs.claim(out, "champ", "another")  # what a rerun does first
    kept = out / f"best-{first.run_id}"
    err = capsys.readouterr().err
    assert "registered champion champ-model version 1" in err and str(kept) in err and "unaffected" in err
    assert not (out / "best").exists() and (kept / "model.safetensors").read_bytes() == weights
    assert locate("models:/champ-model@champion").run_id == first.run_id  # the registry's copy serves the champion

    outputs.update_marker(out, mlflow_run_id="0" * 32)  # a folder whose last run is not a champion: nothing moves
    (out / "best").mkdir()
    (out / "best" / "finetune.json").write_text("{}")
    assert outputs.keep_champion_model(out, outputs.read_marker(out)) is None and (out / "best").exists()


# --- the suite cleans up after itself -----------------------------------------------------------------------------------

def test_the_suite_keeps_no_temporary_folders_of_passing_runs_and_no_hypothesis_files_in_the_checkout(request):
    from hypothesis.configuration import storage_directory

    from tests import conftest

    assert request.config.getini("tmp_path_retention_policy") == "failed"
    assert int(request.config.getini("tmp_path_retention_count")) <= 1
    where = storage_directory("constants", intent_to_write=False).path.resolve()
    assert ROOT not in where.parents, where
    assert not any(".hypothesis" in part for part in conftest._IGNORED_LEFTOVERS)  # the check would flag it
