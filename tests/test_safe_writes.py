"""Issue 33: every writer of an output folder (evaluate, label-issues, export, convert, the evaluation tables) and
every csv for people (compare, label issues, predictions): no writes through links, never over files finetune did
not make, cells never read as formulas by a spreadsheet."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pandas as pd
import pytest

from finetune.cli import main
from finetune.errors import ConversionError, EvaluationError, ExportError
from finetune.files import (OUTPUT_MARKER, RefusedWrite, check_output_folder, move_new, publish_files,
                            spreadsheet_cell, spreadsheet_frame, staging_folder)


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny classification model folder whose label names a spreadsheet would read as formulas."""
    from transformers import AutoModelForSequenceClassification

    from finetune.models.modeling import ModelInfo, load_tokenizer, save_model_dir

    source = tiny_checkpoints["bert"]
    labels = ["=1+1", "@pos"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    info = ModelInfo(task="classification", label_names=labels, text_pair=False, max_length=32)
    return save_model_dir(tmp_path_factory.mktemp("safe") / "model", model, load_tokenizer(source), info, "name: x\n")


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "dev.csv"
    path.write_text("text,label\n" + "".join(f"-text {i} =A1,{'=1+1' if i % 2 else '@pos'}\n" for i in range(8)))
    return path


def _evaluate(model_dir: Path, data: Path, out: Path, *extra: str) -> int:
    return main(["evaluate", str(model_dir), str(data), "--no-log", "--output-dir", str(out), *extra])


def test_evaluate_refuses_folders_it_did_not_make_and_writes_through_no_link(model_dir, data, tmp_path, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine\n")
    assert _evaluate(model_dir, data, foreign) == 2
    assert "--output-dir: " in capsys.readouterr().err and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    (tmp_path / "linked").symlink_to(foreign)
    assert _evaluate(model_dir, data, tmp_path / "linked") == 2 and "symbolic link" in capsys.readouterr().err
    out = tmp_path / "eval"
    assert _evaluate(model_dir, data, out, "--find-label-issues") == 0
    marker = json.loads((out / OUTPUT_MARKER).read_text())
    assert "evaluation.json" in marker["files"]["evaluation"]
    # Its own folder again: a link planted at one of its files is replaced, never followed; a user's file left.
    (out / "evaluation.json").unlink()
    (out / "evaluation.json").symlink_to(victim)
    (out / "my-notes.md").write_text("mine\n")
    assert _evaluate(model_dir, data, out) == 0
    assert victim.read_text() == "precious\n" and not (out / "evaluation.json").is_symlink()
    assert (out / "my-notes.md").read_text() == "mine\n"
    # A folder inside it replaced by a link elsewhere: refused, nothing written there.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    import shutil

    shutil.rmtree(out / "evaluation")
    (out / "evaluation").symlink_to(elsewhere)
    capsys.readouterr()
    assert _evaluate(model_dir, data, out) == 2 and "symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    # Every csv written for people is spreadsheet-safe: label names, texts.
    for path in out.rglob("*.csv"):
        cells = [c for row in csv.reader(open(path, encoding="utf-8")) for c in row]
        assert not any(c[:1] in ("=", "+", "@") or (c[:1] == "-" and not c[1:2].isdigit()) for c in cells), path


def test_label_issues_files_are_safe_and_never_replace_a_users_file(tmp_path):
    from finetune.evaluation.label_issues import write_issues

    table = pd.DataFrame({"row": [3], "sentence": ["=cmd|' /C calc'!A0"], "given_label": ["+x"],
                          "suggested_label": ["-y"], "label_quality": [-0.5]})
    out = tmp_path / "issues"
    path = write_issues(table, out)
    rows = list(csv.reader(open(path, encoding="utf-8")))
    assert rows[1][1:4] == ["'=cmd|' /C calc'!A0", "'+x", "'-y"] and rows[1][4] == "-0.5000"
    assert (out / "label_issues.md").is_file()
    user = tmp_path / "theirs"
    user.mkdir()
    (user / "label_issues.csv").write_text("their own\n")
    with pytest.raises(EvaluationError, match="already holds files finetune did not write .label_issues.csv."):
        write_issues(table, user)
    assert (user / "label_issues.csv").read_text() == "their own\n"


def test_export_refuses_a_folder_it_did_not_make_or_a_link_before_loading(tmp_path):
    from finetune.export.onnx import export_onnx

    target = tmp_path / "dst"
    target.mkdir()
    (target / "weights.bin").write_text("someone's\n")
    with pytest.raises(ExportError, match=r"DST \(the export folder\): .* already holds files finetune did not write"):
        export_onnx(tmp_path / "no-model-needed", target)
    (tmp_path / "link").symlink_to(target)
    with pytest.raises(ExportError, match="symbolic link"):
        export_onnx(tmp_path / "no-model-needed", tmp_path / "link")
    assert [p.name for p in target.iterdir()] == ["weights.bin"]


def test_convert_never_follows_a_link_at_its_target_even_with_overwrite(tmp_path):
    from finetune.models.conversion_folder import check_target, publish, staging_folder as stage_for

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "config.json").write_text("{}")
    (tmp_path / "target").symlink_to(theirs)
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="symbolic link"):
            check_target(tmp_path / "target", overwrite)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConversionError, match="is a file, not a folder"):
        check_target(tmp_path / "file", True)
    # A link that appears while the conversion runs is refused at publishing; what it points at is kept.
    with stage_for(tmp_path / "target") as tmp:
        (tmp / "model.safetensors").write_text("new")
        with pytest.raises(ConversionError, match="symbolic link"):
            publish(tmp, tmp_path / "target", {}, 0.0)
    assert (theirs / "config.json").read_text() == "{}"
    # --overwrite of a real folder: the new one in place, the old one gone, nothing left aside.
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    with stage_for(tmp_path / "real") as tmp:
        (tmp / "model.safetensors").write_text("new")
        publish(tmp, tmp_path / "real", {}, 0.0)
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["conversion.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".real-")]


def test_artifact_writers_replace_planted_links_and_defuse_cells(tmp_path):
    from finetune.reports import artifacts

    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    table = pd.DataFrame({"label": ["=SUM(A1)", "@x", "plain", "-1"], "f1": [0.5, 0.25, 1.0, -1.0]})
    for name in ("per_class_metrics.csv", "per_class_metrics.md", "predictions.csv", "MODEL_CARD.md"):
        (tmp_path / name).symlink_to(victim)
    artifacts.write_table(tmp_path, "per_class_metrics", table)
    artifacts.write_predictions(tmp_path / "predictions.csv", table, ["f1"], [True])
    assert victim.read_text() == "precious\n"
    for name in ("per_class_metrics.csv", "predictions.csv"):
        assert not (tmp_path / name).is_symlink()
        labels = pd.read_csv(tmp_path / name, dtype=str)["label"].tolist()
        assert sorted(labels) == sorted(["'=SUM(A1)", "'@x", "plain", "-1"])


def test_compare_csv_defuses_formulas(tmp_path):
    from finetune.tracking.compare import render

    frame = pd.DataFrame({"run_name": ["=HYPERLINK(\"http://evil\")", "ok"], "accuracy": [0.9, -0.1]})
    text = render(frame, "csv")
    rows = list(csv.reader(text.splitlines()))
    assert rows[1][0].startswith("'=") and rows[2] == ["ok", "-0.1"]
    assert render(frame, "json").count("=HYPERLINK") == 1  # json keeps the value as it is


def test_publish_files_replaces_only_its_own_files_and_removes_its_stale_ones(tmp_path):
    folder = tmp_path / "out"
    stage = staging_folder(folder)
    (stage / "a.txt").write_text("1")
    (stage / "sub").mkdir()
    (stage / "sub" / "b.txt").write_text("2")
    publish_files(stage, folder, "export", "DST")
    assert not stage.exists() and (folder / "sub" / "b.txt").read_text() == "2"
    (folder / "user.txt").write_text("mine")
    stage = staging_folder(folder)
    (stage / "a.txt").write_text("3")
    publish_files(stage, folder, "export", "DST")
    assert (folder / "a.txt").read_text() == "3" and not (folder / "sub" / "b.txt").exists()  # stale: removed
    assert (folder / "user.txt").read_text() == "mine"
    stage = staging_folder(folder)
    (stage / "user.txt").write_text("overwritten?")
    with pytest.raises(RefusedWrite, match=r"holds files finetune did not write there \(user.txt\)"):
        publish_files(stage, folder, "export", "DST")
    assert (folder / "user.txt").read_text() == "mine"
    publish_files(stage, folder, "export", "DST", overwrite=True)  # --overwrite: the user asked for it
    assert (folder / "user.txt").read_text() == "overwritten?"
    # A forged marker cannot point outside the folder.
    (folder / OUTPUT_MARKER).write_text(json.dumps({"created_by": "finetune", "files": {"export": ["../victim"]}}))
    (tmp_path / "victim").write_text("precious")
    stage = staging_folder(folder)
    (stage / "x.txt").write_text("x")
    publish_files(stage, folder, "export", "DST")
    assert (tmp_path / "victim").read_text() == "precious"
    with pytest.raises(RefusedWrite, match="is a file, not a folder"):
        check_output_folder(tmp_path / "victim", "DST")


def test_move_new_never_replaces_and_spreadsheet_cells(tmp_path):
    (tmp_path / "a").write_text("new")
    (tmp_path / "b").symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError):
        move_new(tmp_path / "a", tmp_path / "b")
    move_new(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").read_text() == "new" and not (tmp_path / "a").exists()
    assert [spreadsheet_cell(v) for v in ("-5", "+1.5e3", "-x", "=1", "@a", "\t=1", "ok", -3.0)] == \
        ["-5", "+1.5e3", "'-x", "'=1", "'@a", "'\t=1", "ok", -3.0]
    frame = spreadsheet_frame(pd.DataFrame({"=col": ["=a", "b"], "n": [1, -2]}))
    assert list(frame.columns) == ["'=col", "n"] and frame["=col" if False else "'=col"].tolist() == ["'=a", "b"]
