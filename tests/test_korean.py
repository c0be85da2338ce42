"""Korean data in and out: the shipped Korean recipe trained from the command line, Hangul in JSON output (predict,
scored files, the server, the model card), CP949 files (what Korean Excel saves) with `data.encoding` and
`predict --encoding`, the error a wrong encoding gives, NFD input answered as its NFC twin on every path, and
`finetune compare` lined up with wide characters."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import unicodedata
from pathlib import Path

import pytest

from finetune.cli import main
from tests.conftest import seed_store, tiny_recipe, train_outside_test, write_recipe

ROOT = Path(__file__).resolve().parents[1]
NSMC = ROOT / "data" / "nsmc"
LABELS = ["부정", "긍정"]  # negative, positive
KOREAN = ["이 영화 정말 재미있어요", "시간 낭비였다. 최악의 영화", "배우들의 연기가 훌륭하다"]


def nfd(text: str) -> str:
    return unicodedata.normalize("NFD", text)


def cp949_reviews(path: Path, rows: int = 40) -> Path:
    """The first `rows` test reviews of the shipped sample as Korean Excel saves a CSV (CP949, CRLF), with the
    labels written in Korean."""
    with open(NSMC / "test.tsv", encoding="utf-8", newline="") as f:
        reviews = list(csv.DictReader(f, delimiter="\t"))[:rows]
    with open(path, "w", encoding="cp949", newline="") as f:
        writer = csv.writer(f, lineterminator="\r\n")
        writer.writerow(["리뷰", "감정"])  # Hangul column names too: review, sentiment
        writer.writerows([r["document"], LABELS[r["label"] == "positive"]] for r in reviews)
    return path


@contextlib.contextmanager
def inside(root: Path):
    """The working folder, MLflow store and cache under `root` (module fixtures run outside the per-test ones)."""
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "FINETUNE_CACHE_DIR")}
    cwd = os.getcwd()
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    os.environ["FINETUNE_CACHE_DIR"] = str(root / "cache")
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(cwd)
        for key, value in saved.items():
            os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


@pytest.fixture(scope="module")
def minilm_model(tmp_path_factory, empty_store) -> Path:
    """recipes/korean.yaml run with `finetune run`, as a user runs it (its data paths made absolute, since the test
    runs elsewhere), cut to 4 steps on 32 reviews to stay fast."""
    root = tmp_path_factory.mktemp("korean-recipe")
    seed_store(root, empty_store)  # a copy of a migrated MLflow store, not a new one (seconds of migrations)
    with inside(root):
        code = main(["run", str(ROOT / "recipes" / "korean.yaml"), f"data.files.train={NSMC / 'train.tsv'}",
                     f"data.files.validation={NSMC / 'test.tsv'}", "data.max_train_samples=32",
                     "data.max_eval_samples=16", "training.max_steps=4", "tracking.log_model=false"])
    assert code == 0
    return root / "runs" / "korean" / "best"


@pytest.fixture(scope="module")
def hangul_model(tiny_checkpoints, tmp_path_factory) -> Path:
    """A tiny byte-level BPE (RoBERTa) classifier trained on a CP949 file with data.encoding: cp949, whose columns
    and labels are Hangul."""
    root = tmp_path_factory.mktemp("korean-cp949")
    source = cp949_reviews(root / "reviews.csv")
    recipe = tiny_recipe(tiny_checkpoints["roberta"], name="tiny-korean",
                         data={"files": {"train": str(source)}, "encoding": "cp949", "quoting": "minimal",
                               "text_column": "리뷰", "label_column": "감정", "label_names": LABELS,
                               "validation_size": 0.25, "max_train_samples": None, "max_eval_samples": None},
                         training={"max_steps": 2, "batch_size": 8, "logging_steps": 1},
                         output_dir=str(root / "runs" / "tiny-korean"))
    result = train_outside_test(root, recipe)
    return Path(result.best_dir)


def test_the_korean_recipe_trains_and_predict_json_writes_hangul(minilm_model, capsys):
    assert (minilm_model / "model.safetensors").is_file()
    capsys.readouterr()
    assert main(["predict", str(minilm_model), *KOREAN, "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    answers = [json.loads(line) for line in lines]
    assert [a["input"] for a in answers] == KOREAN
    assert "이 영화 정말 재미있어요" in lines[0] and "\\u" not in "".join(lines)  # Hangul, not \uC601 escapes
    assert {a["label"] for a in answers} <= {"negative", "positive"}


def test_a_cp949_file_trains_with_data_encoding_and_hangul_labels_stay_hangul(hangul_model):
    info = json.loads((hangul_model / "finetune.json").read_text(encoding="utf-8"))
    assert info["label_names"] == LABELS
    card = (hangul_model / "MODEL_CARD.md").read_text(encoding="utf-8")
    assert "`부정`, `긍정`" in card and "리뷰" in card  # labels and the recipe's column names, readable
    assert "\\u" not in card


def test_a_wrong_encoding_is_refused_naming_file_line_and_cp949_before_anything_is_written(tmp_path, capsys):
    source = cp949_reviews(tmp_path / "reviews.csv", rows=8)
    recipe = write_recipe(tmp_path / "recipe.yaml", {
        "model": {"checkpoint": "sentence-transformers/all-MiniLM-L6-v2"},
        "data": {"files": {"train": str(source)}, "text_column": "리뷰", "label_column": "감정"},
        "task": {"type": "classification"}, "output_dir": str(tmp_path / "out")})
    assert main(["run", str(recipe)]) != 0
    err = capsys.readouterr().err
    assert "data.encoding" in err and str(source) in err and "line 1" in err and "not utf-8 text" in err
    assert "set data.encoding: cp949" in err
    # Refused before training: the output folder holds only the log of the failed start, no model, no checkpoint.
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["run.log"]
    # A misspelt codec name is refused by the recipe check, with examples.
    assert main(["validate", str(recipe), "data.encoding=cp-949"]) != 0
    assert "data.encoding: unknown text encoding 'cp-949'; allowed: a Python codec name such as utf-8" in \
        capsys.readouterr().err


def test_file_scoring_reads_cp949_with_encoding_and_writes_utf8(hangul_model, tmp_path, capsys):
    from finetune.models.predictor import Predictor

    source = cp949_reviews(tmp_path / "reviews.csv", rows=6)
    out = tmp_path / "scored.jsonl"
    # Read as UTF-8 (the default) it is refused with the encoding that fits, and nothing is written.
    assert main(["predict", str(hangul_model), "--input", str(source), "--output", str(out)]) != 0
    err = capsys.readouterr().err
    assert "--encoding" in err and "cp949" in err and "line 1" in err
    assert not out.exists() and not list(tmp_path.glob("scored*"))
    with pytest.raises(SystemExit):  # argparse names the flag and gives examples
        main(["predict", str(hangul_model), "--input", str(source), "--output", str(out), "--encoding", "bogus"])
    assert "argument --encoding: unknown text encoding 'bogus'; allowed:" in capsys.readouterr().err
    assert main(["predict", str(hangul_model), "--input", str(source), "--output", str(out),
                 "--encoding", "cp949"]) == 0
    text = out.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines()]
    with open(NSMC / "test.tsv", encoding="utf-8", newline="") as f:
        reviews = [r["document"] for r in list(csv.DictReader(f, delimiter="\t"))[:6]]
    assert [r["리뷰"] for r in rows] == reviews
    expected = Predictor.from_dir(str(hangul_model)).predict(reviews)
    assert [r["pred_label"] for r in rows] == [a["label"] for a in expected]
    assert rows[0]["pred_label"] in text and "\\u" not in text  # Hangul labels and texts as Hangul


@pytest.mark.parametrize("which", ["hangul_model", "minilm_model"])
def test_nfd_input_gets_the_nfc_answer_in_predict_scoring_and_the_server(which, request, tmp_path, capsys):
    from starlette.testclient import TestClient

    from finetune.models.predictor import Predictor
    from serving.app import create_app
    from serving.loading import LoadedModel

    model = request.getfixturevalue(which)
    predictor = Predictor.from_dir(str(model))
    decomposed = [nfd(t) for t in KOREAN]
    assert decomposed != KOREAN
    if which == "hangul_model":  # byte-level BPE has no normaliser: without the NFC step the pieces would differ
        assert predictor.tokenizer(decomposed[0])["input_ids"] != predictor.tokenizer(KOREAN[0])["input_ids"]
    composed = predictor.predict(KOREAN)
    assert predictor.predict(decomposed) == composed

    # `finetune predict TEXT --json`
    capsys.readouterr()
    assert main(["predict", str(model), *decomposed, "--json"]) == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [{k: v for k, v in a.items() if k != "input"} for a in printed] == composed

    # `finetune predict --input` (an NFD file, as macOS tools may write)
    source = tmp_path / "nfd.tsv"
    source.write_text("text\n" + "\n".join(decomposed) + "\n", encoding="utf-8")
    assert main(["predict", str(model), "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
                 "--text-column", "text"]) == 0
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["pred_label"] for r in scored] == [a["label"] for a in composed]
    assert [r["pred_score"] for r in scored] == pytest.approx([a["score"] for a in composed], abs=1e-5)

    # The server: same answers, and the labels come back as Hangul (or as they were named), never as escapes.
    with TestClient(create_app(LoadedModel(predictor, "korean", "1", None, str(model))),
                    base_url="http://127.0.0.1") as client:
        served = client.post("/v1/predict", json={"inputs": decomposed})
        again = client.post("/v1/predict", json={"inputs": KOREAN})
    assert served.status_code == 200
    assert served.json()["predictions"] == again.json()["predictions"]
    assert [a["label"] for a in served.json()["predictions"]] == [a["label"] for a in composed]
    if which == "hangul_model":
        assert composed[0]["label"].encode("utf-8") in served.content and b"\\u" not in served.content


def test_question_answering_offsets_stay_in_the_given_nfd_context(tiny_checkpoints):
    from transformers import AutoTokenizer

    from finetune.tasks.question_answering import context_offsets, tokenize_windows

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoints["roberta"])
    context = "서울은 한국의 수도이고, 부산은 항구 도시입니다."
    question = "한국의 수도는?"
    composed = tokenize_windows(tokenizer, [question], [context], 64, 16)
    decomposed = tokenize_windows(tokenizer, [nfd(question)], [nfd(context)], 64, 16)
    assert decomposed["input_ids"] == composed["input_ids"]
    # Each token's span is a place in the NFD text as given (longer than the NFC one), covering what the same
    # token covers in the NFC text.
    given = [nfd(context)[s:e] for s, e in (o for o in context_offsets(decomposed, 0, nfd(context)) if o)]
    plain = [context[s:e] for s, e in (o for o in context_offsets(composed, 0, context) if o)]
    assert [unicodedata.normalize("NFC", piece) for piece in given] == plain
    assert given != plain and "".join(dict.fromkeys(plain)).startswith("서울은")


def test_compare_lines_up_hangul_run_names():
    import pandas as pd
    from wcwidth import wcswidth

    from finetune.tracking.compare import render

    frame = pd.DataFrame({"run": ["한국어-리뷰-감정", "sst2"], "accuracy": [0.81, 0.9], "champion": ["yes", ""]})
    lines = render(frame, "table").splitlines()
    # Every line takes the same width on a terminal, so the columns line up (without pandas' East Asian width
    # option the Hangul line is 6 columns wider than the others).
    assert len({wcswidth(line) for line in lines}) == 1, lines
    assert "한국어" in render(frame, "json")


def test_the_playground_shows_hangul_texts_and_labels(hangul_model, capsys):
    """In a real browser: the page declares UTF-8, and a Korean review sent from its form comes back drawn with the
    model's Hangul label names, as /v1/predict returns them."""
    import httpx

    from tests.test_playground import _all, _by_id, _submit_text, headless_chromium
    from tests.test_serving import Server

    server = Server("--model", str(hangul_model))
    try:
        page = httpx.get(f"{server.url}/")
        assert '<meta charset="utf-8">' in page.text and "charset=utf-8" in page.headers["content-type"]
        with headless_chromium() as browser:
            browser.get(f"{server.url}/")
            assert browser.execute_script("return document.characterSet") == "UTF-8"
            assert _submit_text(browser, KOREAN[0]) == "done"
            (want,) = httpx.post(f"{server.url}/v1/predict", json={"inputs": [KOREAN[0]]}).json()["predictions"]
            assert {bar.get_attribute("data-label") for bar in _all(browser, "#result .bar")} == set(LABELS)
            assert _by_id(browser, "answer-label").text == want["label"] and want["label"] in LABELS
            assert all(label in _by_id(browser, "result").text for label in LABELS)
    finally:
        server.stop()
