"""NER, extractive QA and multiple choice end to end: tiny recipe -> training -> MLflow -> HTTP answers."""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from finetune.models.predictor import Predictor
from tests.conftest import tiny_recipe, train_outside_test, write_recipe
from tests.test_serving import Server

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
KINDS = {"token_classification": "bert", "question_answering": "distilbert", "multiple_choice": "bert"}
LONG_CONTEXT = " ".join(["The film was good and the actors were fine ."] * 30) + " The director was Maria Garcia ."


@pytest.fixture(scope="module")
def trained(tiny_checkpoints, tmp_path_factory):
    """Each task's tiny recipe trained for a few steps, its model logged to MLflow."""
    root = tmp_path_factory.mktemp("span")
    out = {"tracking_uri": f"sqlite:///{root / 'mlflow.db'}"}
    for kind, family in KINDS.items():
        result = train_outside_test(root, tiny_recipe(
            tiny_checkpoints[family], kind, output_dir=str(root / kind),
            tracking={"log_model": True, "system_metrics": False, "experiment": kind}))
        out[kind] = result
    return out


def test_metrics_and_artifacts_reach_mlflow(trained):
    mlflow.set_tracking_uri(trained["tracking_uri"])
    expected = {
        "token_classification": (["eval/f1", "eval/precision", "eval/recall", "eval/f1_PER", "best/f1"], "evaluation/per_entity_type.csv"),
        "question_answering": (["eval/f1", "eval/exact_match", "best/f1"], "evaluation/predictions.csv"),
        "multiple_choice": (["eval/accuracy", "best/accuracy"], "evaluation/predictions.csv"),
    }
    for kind, (metrics, artifact) in expected.items():
        run = mlflow.get_run(trained[kind].run_id)
        assert set(metrics) <= set(run.data.metrics), (kind, sorted(run.data.metrics))
        assert run.data.tags["finetune.task"] == kind
        path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path=artifact)
        assert len(pd.read_csv(path)) > 0
        assert trained[kind].model_uri, f"{kind}: the model was not logged"
    table = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=trained["token_classification"].run_id, artifact_path="evaluation/per_entity_type.csv"))
    assert set(table["entity type"]) == {"LOC", "MISC", "ORG", "PER", "all (micro)"}


def test_mlflow_pyfunc_models_answer_like_the_model_folder(trained):
    mlflow.set_tracking_uri(trained["tracking_uri"])
    inputs = {
        "token_classification": ["Maria Garcia visited Paris ."],
        "question_answering": [{"question": "Who was the director?", "context": LONG_CONTEXT}],
        "multiple_choice": [{"context": "The man lit the fire.", "choices": ["It got warm.", "It snowed.", "He slept."]}],
    }
    for kind, items in inputs.items():
        pyfunc = mlflow.pyfunc.load_model(trained[kind].model_uri)
        assert pyfunc.predict(items) == Predictor.from_dir(trained[kind].best_dir).predict(items), kind


@pytest.fixture(scope="module")
def servers(trained):
    """One server per task, each loading its model from MLflow by run id, as a user would."""
    env = {"MLFLOW_TRACKING_URI": trained["tracking_uri"]}
    started: dict[str, Server] = {}
    try:
        for kind in KINDS:
            started[kind] = Server("--model", trained[kind].run_id, "--max-wait-ms", "20", env=env)
        yield started
    finally:  # also when a later server fails to start, so no process outlives the tests
        for server in started.values():
            server.stop()


def test_ner_answers_with_entities_and_character_spans(servers, trained):
    server = servers["token_classification"]
    texts = ["Maria Garcia visited Paris on Monday .", "Shares of Siemens rose after the German report ."]
    response = server.post({"inputs": texts})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions == Predictor.from_dir(trained["token_classification"].best_dir).predict(texts)
    for text, answer in zip(texts, predictions):
        assert answer["truncated"] is False
        for entity in answer["entities"]:
            assert set(entity) == {"type", "text", "start", "end", "score"}
            assert entity["type"] in {"PER", "LOC", "ORG", "MISC"}
            assert text[entity["start"]:entity["end"]] == entity["text"] and 0 < entity["score"] <= 1
    info = httpx_get(server, "/v1/model")
    assert info["task"] == "token_classification" and "B-PER" in info["label_names"]
    bad = server.post({"inputs": [{"question": "q", "context": "c"}]})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "inputs", 0]
    long = server.post({"inputs": [LONG_CONTEXT]}).json()["predictions"][0]
    assert long["truncated"] is True
    assert server.post({"inputs": [LONG_CONTEXT], "options": {"truncate": False}}).status_code == 422


def test_qa_answers_spans_of_long_contexts(servers, trained):
    server = servers["question_answering"]
    items = [{"question": "Who was the director?", "context": LONG_CONTEXT},
             {"question": "What was good?", "context": "The film was good."}]
    response = server.post({"inputs": items})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions == Predictor.from_dir(trained["question_answering"].best_dir).predict(items)
    for item, answer in zip(items, predictions):
        assert set(answer) == {"answer", "start", "end", "score", "truncated"}
        assert item["context"][answer["start"]:answer["end"]] == answer["answer"]
        assert answer["truncated"] is False
    for bad in (["a string"], [{"question": "q"}], [{"question": "", "context": "c"}],
                [{"question": "q", "context": "c", "extra": 1}]):
        reply = server.post({"inputs": bad})
        assert reply.status_code == 422, (bad, reply.text)
    huge = {"question": "q?", "context": "word " * 5000}
    refused = server.post({"inputs": [huge]})
    assert refused.status_code == 422 and "windows" in refused.text


def test_multiple_choice_answers_with_index_text_and_scores(servers):
    server = servers["multiple_choice"]
    items = [{"context": "The man lit the fire.", "choices": ["It got warm.", "It snowed."]},
             {"context": "She opened the", "choices": ["door.", "sky.", "idea.", "song."], "start": "Then she"}]
    response = server.post({"inputs": items})
    assert response.status_code == 200, response.text
    for item, answer in zip(items, response.json()["predictions"]):
        assert item["choices"][answer["choice"]] == answer["text"]
        assert len(answer["scores"]) == len(item["choices"]) and sum(answer["scores"]) == pytest.approx(1.0)
        assert answer["score"] == max(answer["scores"])
    # requests with different numbers of choices are batched together and still answered one by one
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda i: server.post({"inputs": [items[i % 2]]}), range(16)))
    assert all(r.status_code == 200 for r in replies)
    assert {len(r.json()["predictions"][0]["scores"]) for r in replies} == {2, 4}
    assert server.post({"inputs": [{"context": "c", "choices": ["one"]}]}).status_code == 422


def test_cli_validate_and_predict_for_the_new_tasks(trained, tiny_checkpoints, tmp_path, capsys):
    from finetune.cli import main

    recipe = write_recipe(tmp_path / "qa.yaml", tiny_recipe(tiny_checkpoints["bert"], "question_answering"))
    assert main(["validate", str(recipe)]) == 0
    assert "of contexts need more than one window of max_length 64" in capsys.readouterr().out
    question = json.dumps({"question": "Who was the director?", "context": LONG_CONTEXT})
    # As a user runs it, in a process of its own; the refusal below in this one.
    out = subprocess.run([str(BIN / "finetune"), "predict", str(trained["question_answering"].best_dir), question, "--json"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["answer"] in LONG_CONTEXT
    assert main(["predict", str(trained["question_answering"].best_dir), "not json"]) != 0
    assert "JSON objects" in capsys.readouterr().err


def httpx_get(server: Server, path: str) -> dict:
    import httpx

    return httpx.get(f"{server.url}{path}", timeout=10).json()


def test_onnx_export_refuses_span_tasks_with_a_reason(trained, tmp_path):
    from finetune.errors import ExportError
    from finetune.export.onnx import export_onnx

    with pytest.raises(ExportError, match="not token_classification"):
        export_onnx(trained["token_classification"].best_dir, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()
