"""`finetune predict MODEL --input FILE --output FILE`: whole files, streamed, in order, resumable after a kill."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from finetune.cli import main
from finetune.errors import DataError
from finetune.evaluation.data import data_section
from finetune.evaluation.scoring import ScoreSettings, score_file
from finetune.models.predictor import Predictor
from tests.conftest import DATA, ROOT, tiny_recipe

SENTENCES = [row[0] for row in csv.reader(open(DATA / "sst2" / "train.tsv", encoding="utf-8"), delimiter="\t",
                                         quoting=csv.QUOTE_NONE)][1:]


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoints, tmp_path_factory) -> Path:
    """A classification model folder (random head: scoring needs answers, not good ones) trained on `sentence`."""
    import yaml
    from transformers import AutoModelForSequenceClassification

    from finetune.models.modeling import ModelInfo, load_tokenizer, save_model_dir

    source = tiny_checkpoints["bert"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source, num_labels=2, id2label={0: "negative", 1: "positive"}, label2id={"negative": 0, "positive": 1})
    info = ModelInfo(task="classification", label_names=["negative", "positive"], text_pair=False, max_length=64)
    target = tmp_path_factory.mktemp("scoring") / "model"
    return save_model_dir(target, model, load_tokenizer(source), info, yaml.safe_dump(tiny_recipe(source)))


def write_csv(path: Path, rows: int) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence", "note"])
        for i in range(rows):
            writer.writerow([f"{i:05d}", SENTENCES[i % len(SENTENCES)], "NA" if i % 7 == 0 else f'say "{i}", ok'])
    return path


def _score(model_dir: Path, source: Path, target: Path, **settings) -> None:
    predictor = Predictor.from_dir(model_dir)
    data = data_section(str(source), None, {"text_column": "sentence"}, {})
    score_file(predictor, source, target, data, ScoreSettings(model=str(model_dir), runtime=predictor.runtime,
                                                              columns={"data.text_column": "sentence"}, **settings),
               progress=False)


def _read(path: Path) -> pd.DataFrame:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    if path.suffix == ".jsonl":
        return pd.read_json(path, lines=True, dtype=False)
    return pd.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",", dtype=str, keep_default_na=False)


@pytest.mark.parametrize("ending", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_every_format_keeps_the_input_columns_and_order_and_answers_as_predict(model_dir, tmp_path, ending):
    source = write_csv(tmp_path / "in.csv", 300)
    target = tmp_path / f"out{ending}"
    _score(model_dir, source, target, chunk_rows=128)
    out = _read(target)
    assert list(out.columns) == ["id", "sentence", "note", "pred_label", "pred_score", "pred_scores", "pred_truncated",
                                 "pred_error"]
    original = pd.read_csv(source, dtype=str, keep_default_na=False)
    assert out["id"].tolist() == original["id"].tolist()  # in order, "00007" kept as written
    assert out["note"].tolist() == original["note"].tolist()  # "NA" is text, quotes survive
    answers = Predictor.from_dir(model_dir).predict(original["sentence"].tolist())
    assert out["pred_label"].tolist() == [a["label"] for a in answers]
    scores = [float(s) for s in out["pred_score"]]
    assert scores == pytest.approx([a["score"] for a in answers], abs=1e-6)
    first = out["pred_scores"].iloc[0]
    assert (first if isinstance(first, dict) else json.loads(first)).keys() == {"negative", "positive"}
    assert not any(out["pred_error"]) and not (tmp_path / f"out{ending}.progress.json").exists()


@pytest.mark.parametrize("ending", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_inputs(model_dir, tmp_path, ending):
    frame = pd.read_csv(write_csv(tmp_path / "in.csv", 50), dtype=str, keep_default_na=False)
    source = tmp_path / f"in{ending}"
    frame.to_json(source, orient="records", lines=True) if ending == ".jsonl" else frame.to_parquet(source)
    _score(model_dir, source, tmp_path / "out.csv")
    out = _read(tmp_path / "out.csv")
    assert out["id"].tolist() == frame["id"].tolist()
    assert out["pred_label"].tolist() == [a["label"] for a in Predictor.from_dir(model_dir).predict(frame["sentence"].tolist())]


def test_rows_the_model_cannot_read_get_a_reason_and_the_rest_is_scored(model_dir, tmp_path):
    source = tmp_path / "in.csv"
    source.write_text("id,sentence\n1,a fine film\n2,\n3,   \n4,dull\n")
    _score(model_dir, source, tmp_path / "out.csv")
    out = _read(tmp_path / "out.csv")
    assert out["pred_error"].tolist() == ["", "empty text", "empty text", ""]
    assert out["pred_label"].tolist()[1:3] == ["", ""] and all(out["pred_label"].iloc[[0, 3]])


def test_refusals_name_the_option(model_dir, tmp_path, capsys):
    source = write_csv(tmp_path / "in.csv", 5)
    (tmp_path / "out.csv").write_text("already here\n")
    args = ["predict", str(model_dir), "--input", str(source), "--output", str(tmp_path / "out.csv")]
    assert main(args) == 2 and "exists; pass --overwrite" in capsys.readouterr().err
    assert main(args + ["--overwrite"]) == 0 and len(_read(tmp_path / "out.csv")) == 5
    capsys.readouterr()
    assert main(args + ["--overwrite", "--text-column", "review"]) == 2
    assert "--text-column (data.text_column): column 'review' is not in" in capsys.readouterr().err
    assert main(["predict", str(model_dir), "--input", str(source), "--output", str(tmp_path / "out.xlsx")]) == 2
    assert "allowed: .csv, .tsv, .jsonl, .parquet" in capsys.readouterr().err
    # The model's text arguments still work.
    assert main(["predict", str(model_dir), "a gripping, beautiful film"]) == 0
    assert "a gripping, beautiful film" in capsys.readouterr().out


def test_onnx_backend_scores_files_as_pytorch_does(model_dir, tmp_path):
    from finetune.export.onnx import export_onnx

    export_onnx(model_dir, tmp_path / "onnx", check=False)
    source = write_csv(tmp_path / "in.csv", 40)
    assert main(["predict", str(tmp_path / "onnx"), "--input", str(source), "--output", str(tmp_path / "onnx.csv"),
                 "--backend", "onnx"]) == 0
    _score(model_dir, source, tmp_path / "torch.csv")
    onnx, torch_ = _read(tmp_path / "onnx.csv"), _read(tmp_path / "torch.csv")
    assert onnx["pred_label"].tolist() == torch_["pred_label"].tolist()
    assert onnx["pred_score"].astype(float).tolist() == pytest.approx(torch_["pred_score"].astype(float).tolist(), abs=1e-4)


PEAK = ("import resource, sys; from finetune.cli import main; code = main(sys.argv[1:]); "
        "print('peak_kb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)")


def _predict_process(model_dir: Path, source: Path, target: Path, *extra: str) -> subprocess.Popen:
    # One thread: a 32-wide model gains nothing from two, and on a shared machine two spinning OpenMP threads make
    # it up to 30 times slower (measured), which only lengthens the test.
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", PEAK, "predict", str(model_dir), "--input", str(source), "--output",
                             str(target), *extra], cwd=target.parent, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_a_10k_row_file_streams_peak_memory_does_not_grow_with_its_length(model_dir, tmp_path):
    peaks = {}
    for rows in (10_000, 30_000):
        source = write_csv(tmp_path / f"in{rows}.csv", rows)
        proc = _predict_process(model_dir, source, tmp_path / f"out{rows}.csv", "--chunk-rows", "1000")
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        peaks[rows] = int(out.split("peak_kb")[1].split()[0]) / 1024
        assert len(_read(tmp_path / f"out{rows}.csv")) == rows
    # Holding the 20,000 extra rows (texts, features, answers) would take well over 50 MB; streamed, the peak
    # moves by allocator noise only.
    assert peaks[30_000] - peaks[10_000] < 25, peaks


def test_a_killed_job_resumes_where_it_stopped_without_losing_or_repeating_rows(model_dir, tmp_path):
    source = write_csv(tmp_path / "in.csv", 10_000)
    target = tmp_path / "out.csv"
    progress = tmp_path / "out.csv.progress.json"
    proc = _predict_process(model_dir, source, target, "--chunk-rows", "500")
    deadline = time.time() + 600
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if progress.is_file():
            done = json.loads(progress.read_text())["rows_done"]
            if done >= 1500:
                break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert 1500 <= done < 10_000, f"the job was not caught mid-way (rows done: {done})"
    assert (tmp_path / "out.csv.partial").is_file() and not target.exists()

    assert main(["predict", str(model_dir), "--input", str(source), "--output", str(target),
                 "--chunk-rows", "500"]) == 0
    resumed = _read(target)
    assert resumed["id"].tolist() == [f"{i:05d}" for i in range(10_000)]  # every row once, in order
    _score(model_dir, source, tmp_path / "whole.csv", chunk_rows=500)
    whole = _read(tmp_path / "whole.csv")
    assert resumed["pred_label"].tolist() == whole["pred_label"].tolist()
    assert resumed["pred_score"].astype(float).tolist() == pytest.approx(whole["pred_score"].astype(float).tolist(), abs=1e-6)
    assert not progress.exists() and not (tmp_path / "out.csv.partial").exists()


def test_resuming_with_other_settings_is_refused(model_dir, tmp_path):
    source = write_csv(tmp_path / "in.csv", 10)
    target = tmp_path / "out.csv"
    (tmp_path / "out.csv.partial").write_text("id,sentence\n")
    (tmp_path / "out.csv.progress.json").write_text(json.dumps({"version": 1, "rows_done": 0, "bytes": 12}))
    with pytest.raises(DataError, match="interrupted job of another finetune version"):
        _score(model_dir, source, target)


# --- issue 33: links, bounds, resume by content, spreadsheet cells -------------------------------------------------

def _interrupted(model_dir: Path, source: Path, target: Path, monkeypatch, after_chunks: int = 1, **settings) -> None:
    """A job stopped after `after_chunks` chunks, as a kill would leave it (progress record and partial output)."""
    import finetune.evaluation.scoring as scoring

    calls = {"n": 0}
    real = scoring.answer_chunk

    def stop_after(*args, **kwargs):
        if calls["n"] == after_chunks:
            raise KeyboardInterrupt
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "answer_chunk", stop_after)
    with pytest.raises(KeyboardInterrupt):
        _score(model_dir, source, target, **settings)
    monkeypatch.setattr(scoring, "answer_chunk", real)
    assert json.loads(Path(f"{target}.progress.json").read_text())["rows_done"] == 10 * after_chunks


def test_links_planted_where_the_job_writes_are_never_written_through(model_dir, tmp_path):
    source = write_csv(tmp_path / "in.csv", 12)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for suffix in (".partial", ".progress.json", ""):  # the partial output, the progress record, OUTPUT itself
        target = tmp_path / f"out{len(suffix)}.csv"
        link = Path(f"{target}{suffix}")
        link.symlink_to(victim)
        with pytest.raises(DataError, match=str(link.name)):
            _score(model_dir, source, target)
        assert victim.read_text() == "precious\n" and link.is_symlink()
    # A parts folder of a parquet job linked elsewhere: refused, the folder it points at untouched.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "part-000000.parquet").write_text("mine")
    (tmp_path / "out.parquet.parts").symlink_to(elsewhere)
    with pytest.raises(DataError, match="out.parquet.parts"):
        _score(model_dir, source, tmp_path / "out.parquet")
    assert (elsewhere / "part-000000.parquet").read_text() == "mine"
    # --overwrite replaces a link at OUTPUT (the link, never the file it points at).
    (tmp_path / "out.jsonl").symlink_to(victim)
    assert main(["predict", str(model_dir), "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
                 "--overwrite"]) == 0
    assert victim.read_text() == "precious\n" and not (tmp_path / "out.jsonl").is_symlink()
    assert len(_read(tmp_path / "out.jsonl")) == 12


def test_an_output_that_appears_while_the_job_runs_is_not_replaced(model_dir, tmp_path, monkeypatch):
    import finetune.evaluation.scoring as scoring

    source = write_csv(tmp_path / "in.csv", 5)
    target = tmp_path / "out.csv"
    real = scoring.answer_chunk

    def meanwhile(*args, **kwargs):
        target.write_text("the user's own file\n")
        return real(*args, **kwargs)

    monkeypatch.setattr(scoring, "answer_chunk", meanwhile)
    with pytest.raises(DataError, match="appeared while the job ran; the scored rows are kept in"):
        _score(model_dir, source, target)
    assert target.read_text() == "the user's own file\n" and (tmp_path / "out.csv.partial").is_file()


def test_resuming_needs_the_same_model_and_input_content(model_dir, tiny_checkpoints, tmp_path, monkeypatch):
    import shutil

    import torch

    source = write_csv(tmp_path / "in.csv", 30)
    target = tmp_path / "out.csv"
    # The model folder at the same path retrained (one weight changed): the rows done came from another model.
    changed = tmp_path / "model"
    shutil.copytree(model_dir, changed)
    _interrupted(changed, source, target, monkeypatch, chunk_rows=10)
    predictor = Predictor.from_dir(changed)
    with torch.no_grad():
        next(predictor.model.parameters()).add_(0.5)
    from finetune.models.modeling import save_model_dir

    shutil.rmtree(changed)
    save_model_dir(changed, predictor.model, predictor.tokenizer, predictor.info, (model_dir / "recipe.yaml").read_text())
    with pytest.raises(DataError, match="interrupted job of another model"):
        _score(changed, source, target, chunk_rows=10)
    # The input rewritten with the same size and time: its content is what is compared.
    target = tmp_path / "out2.csv"
    _interrupted(model_dir, source, target, monkeypatch, chunk_rows=10)
    stat = source.stat()
    text = source.read_bytes()
    source.write_bytes(text.replace(b"00003", b"00009", 1))
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert source.stat().st_size == stat.st_size
    with pytest.raises(DataError, match="content of rows 1-10 changed"):
        _score(model_dir, source, target, chunk_rows=10)
    # A shortened input is refused too; the same content under another name resumes (content, not path).
    source.write_bytes(text)
    short = tmp_path / "short.csv"
    short.write_bytes(b"\n".join(text.splitlines()[:6]) + b"\n")
    with pytest.raises(DataError, match="it now has 5 rows"):
        _score(model_dir, short, target, chunk_rows=10)
    moved = tmp_path / "moved.csv"
    source.rename(moved)
    _score(model_dir, moved, target, chunk_rows=10)
    assert _read(target)["id"].tolist() == [f"{i:05d}" for i in range(30)]


def test_progress_records_are_read_with_a_bound(model_dir, tmp_path):
    source = write_csv(tmp_path / "in.csv", 5)
    (tmp_path / "out.csv.partial").write_text("id\n")
    progress = tmp_path / "out.csv.progress.json"
    for content, reason in (("[" * 5000 + "]" * 5000, "nests deeper"), (" " * 200_000 + "{}", "bytes; at most"),
                            ('{"version": 2, "rows_done": "lots"}', "not a progress record finetune wrote")):
        progress.write_text(content)
        with pytest.raises(DataError, match=reason):
            _score(model_dir, source, tmp_path / "out.csv")


def test_over_long_inputs_are_answered_with_the_reason_without_tokenising(model_dir, tmp_path, monkeypatch):
    import finetune.evaluation.scoring as scoring
    from finetune.files import MAX_INPUT_CHARS

    long_text = "word " * (MAX_INPUT_CHARS // 5 + 10)
    source = tmp_path / "in.csv"
    source.write_text(f"id,sentence\n1,a fine film\n2,{long_text}\n3,dull\n")
    _score(model_dir, source, tmp_path / "out.csv")
    out = _read(tmp_path / "out.csv")
    assert out["pred_error"].tolist()[1] == f"{len(long_text)} characters; at most {MAX_INPUT_CHARS} per input (as finetune serve)"
    assert out["pred_label"].tolist()[1] == "" and all(out["pred_label"].iloc[[0, 2]])
    # The same in parquet (no reader bound there) ...
    pd.DataFrame({"id": ["1", "2"], "sentence": ["fine", long_text]}).to_parquet(tmp_path / "in.parquet")
    _score(model_dir, tmp_path / "in.parquet", tmp_path / "out.parquet")
    assert "characters; at most" in pd.read_parquet(tmp_path / "out.parquet")["pred_error"].iloc[1]
    # ... a jsonl line too long to hold is skipped in pieces and answered, the rows around it scored ...
    monkeypatch.setattr(scoring, "MAX_LINE_BYTES", 2000)
    lines = [json.dumps({"id": "a", "sentence": "good"}), json.dumps({"id": "b", "sentence": "x " * 5000}),
             json.dumps({"id": "c", "sentence": "bad"})]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    _score(model_dir, tmp_path / "in.jsonl", tmp_path / "out.jsonl")
    out = _read(tmp_path / "out.jsonl")
    assert out["pred_error"].tolist()[0] == "" and out["pred_error"].tolist()[2] == ""
    assert out["pred_error"].tolist()[1].startswith("line 2 is over")
    # ... and a csv row longer than the reader's block is refused by name, not read whole.
    monkeypatch.setattr(scoring, "CSV_BLOCK_BYTES", 4096)
    source.write_text("id,sentence\n1,fine\n2," + "y" * 20_000 + "\n")
    with pytest.raises(DataError, match="has a row of more than"):
        _score(model_dir, source, tmp_path / "out3.csv")


def test_csv_and_tsv_outputs_are_safe_in_a_spreadsheet_jsonl_keeps_values(tiny_checkpoints, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from finetune.models.modeling import ModelInfo, load_tokenizer, save_model_dir

    source_ckpt = tiny_checkpoints["bert"]
    labels = ["=HYPERLINK(\"http://x\")", "@SUM(1)"]
    model = AutoModelForSequenceClassification.from_pretrained(
        source_ckpt, num_labels=2, id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    info = ModelInfo(task="classification", label_names=labels, text_pair=False, max_length=32)
    folder = save_model_dir(tmp_path / "model", model, load_tokenizer(source_ckpt), info, "name: x\n")
    source = tmp_path / "in.csv"
    source.write_text("id,sentence\n-5,+cmd|' /C calc'!A0\n7,fine\n")
    for ending, sep in ((".csv", ","), (".tsv", "\t")):
        _score(folder, source, tmp_path / f"out{ending}")
        rows = list(csv.reader(open(tmp_path / f"out{ending}", encoding="utf-8"), delimiter=sep))
        assert all(not cell[:1] in ("=", "+", "@") for row in rows for cell in row), rows
        assert rows[1][0] == "-5" and rows[1][1] == "'+cmd|' /C calc'!A0"  # a number stays a number
        assert {row[2] for row in rows[1:]} <= {"'" + n for n in labels} and rows[0][2] == "pred_label"
    _score(folder, source, tmp_path / "out.jsonl")
    assert set(_read(tmp_path / "out.jsonl")["pred_label"]) <= set(labels)
