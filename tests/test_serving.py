"""The HTTP service end to end: a real uvicorn process on a loopback port, called over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import httpx
import mlflow
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from finetune.models.predictor import Predictor
from tests.conftest import tiny_recipe, train_outside_test, wait_for_http

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent


class Server:
    """`finetune serve ...` in a subprocess, ready when /readyz says so."""

    def __init__(self, *args: str, env: dict | None = None, log: Path | None = None):
        """log: write the server's output there (for tests that read it) instead of a pipe nobody drains."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        out = open(log, "w") if log else subprocess.PIPE
        self.proc = subprocess.Popen(
            [str(BIN / "finetune"), "serve", "--port", str(self.port), *args],
            stdout=out, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})},
        )
        if log:
            out.close()
        if not wait_for_http(f"{self.url}/readyz", self.proc):
            raise RuntimeError(f"server did not start:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """What the server has printed (all of it when it writes to a log; else only once it has exited)."""
        return self.log.read_text() if self.log else self.proc.stdout.read()

    def post(self, body, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/predict", json=body, timeout=30, **kw)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def models(tiny_checkpoints, tmp_path_factory):
    """One tiny model per task, trained for a few steps, with its MLflow run (for the parity check)."""
    root = tmp_path_factory.mktemp("served")
    out = {}
    for kind, family in [("classification", "bert"), ("pair", "distilbert"), ("regression", "bert"), ("multi_label", "bert")]:
        result = train_outside_test(root, tiny_recipe(
            tiny_checkpoints[family], kind, output_dir=str(root / kind),
            tracking={"log_model": False, "system_metrics": False, "experiment": "served"}))
        out[kind] = (result.best_dir, result.run_id)
    out["tracking_uri"] = f"sqlite:///{root / 'mlflow.db'}"
    return out


@pytest.fixture(scope="module")
def classifier(models):
    server = Server("--model", str(models["classification"][0]), "--max-wait-ms", "20")
    yield server
    server.stop()


def test_classification_answers_with_label_score_and_all_scores(classifier):
    response = classifier.post({"inputs": ["a gripping, beautiful film", "dull"], "options": {"top_k": 2}})
    assert response.status_code == 200, response.text
    body = response.json()
    assert len(body["predictions"]) == 2
    first = body["predictions"][0]
    assert first["label"] in {"negative", "positive"}
    assert sum(first["scores"].values()) == pytest.approx(1.0)
    assert first["score"] == max(first["scores"].values())
    assert [t["label"] for t in first["top_k"]][0] == first["label"]
    assert first["truncated"] is False


def test_parity_with_evaluation_predictions(classifier, models):
    """The server answers exactly what evaluation predicted for the same inputs (same task definition)."""
    mlflow.set_tracking_uri(models["tracking_uri"])
    path = mlflow.artifacts.download_artifacts(run_id=models["classification"][1], artifact_path="evaluation/predictions.csv")
    expected = pd.read_csv(path, keep_default_na=False)
    response = classifier.post({"inputs": expected["text"].tolist()})
    assert response.status_code == 200
    got = response.json()["predictions"]
    assert [p["label"] for p in got] == expected["predicted"].tolist()
    assert [p["score"] for p in got] == pytest.approx(expected["score"].tolist(), abs=1e-5)


def test_servers_bind_to_loopback_by_default():
    from finetune.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["serve"]).host == "127.0.0.1"
    assert parser.parse_args(["ui"]).host == "127.0.0.1"


def test_info_health_readiness_and_docs(classifier):
    info = httpx.get(f"{classifier.url}/v1/model").json()
    assert info["task"] == "classification" and info["label_names"] == ["negative", "positive"]
    assert info["max_length"] == 64 and "accuracy" in info["metrics"]
    assert info["runtime"] == "pytorch fp32"  # the default: answers exactly as evaluation scored them
    assert httpx.get(f"{classifier.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{classifier.url}/readyz").json() == {"status": "ready"}
    schema = httpx.get(f"{classifier.url}/openapi.json").json()
    body = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert "inputs" in body["properties"] and "$ref" not in str(body)
    assert httpx.get(f"{classifier.url}/docs").status_code == 200


def test_docs_and_playground_load_nothing_from_elsewhere(classifier):
    """/docs, /redoc and the playground reference only this server's assets (no CDN), and each is served."""
    for page in ("/docs", "/redoc", "/"):
        response = httpx.get(f"{classifier.url}{page}")
        assert response.status_code == 200 and "text/html" in response.headers["content-type"], page
        assert not re.search(r"\bhttps?://|//cdn|fonts\.googleapis", response.text), (page, response.text[:2000])
        refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", response.text)
        refs += re.findall(r"""\burl:\s*["']([^"']+)["']""", response.text)  # Swagger UI's OpenAPI document
        assert refs, page
        for ref in refs:
            if ref.startswith("data:"):
                continue
            asset = httpx.get(urljoin(f"{classifier.url}{page}", ref))
            assert asset.status_code == 200 and asset.content, (page, ref, asset.status_code)
    assert "swagger-ui-bundle.js" in httpx.get(f"{classifier.url}/docs").text
    for own in ("/static/playground.js", "/static/playground.css"):  # vendored bundles are checked in a browser
        assert not re.search(r"\bhttps?://", httpx.get(f"{classifier.url}{own}").text), own


def test_form_encoded_curl_body_is_accepted(classifier):
    # `curl -d '{...}'` sends application/x-www-form-urlencoded; the README's example must still work.
    response = httpx.post(f"{classifier.url}/v1/predict", content=b'{"inputs":["a gripping, beautiful film"]}',
                          headers={"content-type": "application/x-www-form-urlencoded"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    "body,status,where",
    [
        ({"inputs": []}, 422, ["body", "inputs"]),
        ({"inputs": ["ok"] * 65}, 422, ["body", "inputs"]),
        ({"inputs": [""]}, 422, ["body", "inputs", 0]),
        ({"inputs": ["fine", "   "]}, 422, ["body", "inputs", 1]),
        ({"inputs": [3]}, 422, ["body", "inputs", 0]),
        ({"inputs": [["a", "b"]]}, 422, ["body", "inputs", 0]),
        ({"inputs": ["x"], "options": {"top_k": 0}}, 422, ["body", "options", "top_k"]),
        ({"inputs": ["x"], "options": {"colour": "red"}}, 422, ["body", "options", "colour"]),
        ({"inputs": ["word " * 200], "options": {"truncate": False}}, 422, ["body", "inputs", 0]),
        ({"text": "x"}, 422, ["body", "inputs"]),
    ],
)
def test_bad_requests_get_4xx_naming_the_field(classifier, body, status, where):
    response = classifier.post(body)
    assert response.status_code == status, response.text
    locations = [d["loc"][: len(where)] for d in response.json()["detail"]]
    assert where in locations, response.json()


def test_long_input_is_truncated_and_flagged(classifier):
    (answer,) = classifier.post({"inputs": ["word " * 200]}).json()["predictions"]
    assert answer["truncated"] is True


def test_oversized_and_malformed_bodies(classifier):
    big = httpx.post(f"{classifier.url}/v1/predict", content=b"x" * 1_200_000, timeout=30)
    assert big.status_code == 413
    for raw in [b"", b"{", b"null", b'{"inputs": "text"}', b"\xff\xfe"]:
        response = httpx.post(f"{classifier.url}/v1/predict", content=raw, timeout=30)
        assert response.status_code == 422, (raw, response.text)
    assert httpx.get(f"{classifier.url}/healthz").status_code == 200


def test_concurrent_requests_are_batched_and_all_correct(classifier, models):
    texts = [f"the film is {'good ' * (i % 7)}and {'bad ' * (i % 5)}" for i in range(200)]
    expected = Predictor.from_dir(models["classification"][0]).predict(texts)

    async def fire():
        # one address may hold at most 32 connections (serving's per-client cap; httpx would open 100)
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as client:
            return await asyncio.gather(*[client.post(f"{classifier.url}/v1/predict", json={"inputs": [t]}) for t in texts])

    responses = asyncio.run(fire())
    assert [r.status_code for r in responses] == [200] * 200
    for response, want in zip(responses, expected):
        (got,) = response.json()["predictions"]
        assert got["label"] == want["label"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)
    metrics = httpx.get(f"{classifier.url}/metrics").text
    values = {line.split(" ")[0]: float(line.split(" ")[1]) for line in metrics.splitlines() if line and not line.startswith("#")}
    batches = values["finetune_batch_size_count"]
    single = values['finetune_batch_size_bucket{le="1.0"}']
    assert batches - single > 0, "no batch held more than one input"
    assert values['finetune_requests_total{route="/v1/predict",status="200"}'] >= 200
    assert 'finetune_request_latency_seconds_bucket{le="0.005",route="/v1/predict"}' in values
    assert "finetune_queue_depth" in values


def test_other_tasks(models):
    """Pairs, regression and multi-label from one server (one start instead of three): the first model at the
    single-model route, each at its own route."""
    server = Server(*[arg for kind in ("pair", "regression", "multi_label")
                      for arg in ("--model", f"{kind}={models[kind][0]}")])

    def post(kind: str, body: dict) -> httpx.Response:
        return httpx.post(f"{server.url}/v1/models/{kind}/predict", json=body, timeout=30)

    try:
        ok = server.post({"inputs": [["The cat sat.", "A cat was sitting."]]})
        assert ok.status_code == 200 and ok.json()["predictions"][0]["label"] in {"0", "1"}
        assert post("pair", {"inputs": [["The cat sat.", "A cat was sitting."]]}).json() == ok.json()
        wrong = server.post({"inputs": ["just one text"]})
        assert wrong.status_code == 422 and wrong.json()["detail"][0]["loc"] == ["body", "inputs", 0]
        short = server.post({"inputs": [["only one"]]})
        assert short.status_code == 422

        (answer,) = post("regression", {"inputs": ["a fine film"]}).json()["predictions"]
        assert isinstance(answer["value"], float) and "label" not in answer

        low = post("multi_label", {"inputs": ["thanks, I love it"], "options": {"threshold": 0.01}}).json()["predictions"][0]
        high = post("multi_label", {"inputs": ["thanks, I love it"], "options": {"threshold": 0.99}}).json()["predictions"][0]
        assert len(low["labels"]) == 28 and high["labels"] == []
        assert all(0 < s < 1 for s in low["scores"].values())
        assert post("multi_label", {"inputs": ["x"], "options": {"threshold": 1.5}}).status_code == 422
    finally:
        server.stop()


def test_bf16_precision_is_served_and_reported(models):
    """--precision bf16 runs the PyTorch model under bf16 autocast: near the fp32 answers, and /v1/model says so."""
    from finetune.errors import ModelSourceError
    from serving.loading import load_model

    path = str(models["regression"][0])
    texts = ["a fine film", "dull and far too long", "the best thing I have seen this year", "meh"]
    fp32 = [a["value"] for a in Predictor.from_dir(path).predict(texts)]
    bf16 = [a["value"] for a in Predictor.from_dir(path, precision="bf16").predict(texts)]
    assert bf16 != fp32, "bf16 autocast did not run"
    assert bf16 == pytest.approx(fp32, abs=0.05)
    server = Server("--model", path, "--precision", "bf16")
    try:
        assert httpx.get(f"{server.url}/v1/model").json()["runtime"] == "pytorch bf16"
        served = [a["value"] for a in server.post({"inputs": texts}).json()["predictions"]]
        assert served == pytest.approx(bf16, abs=1e-6)
    finally:
        server.stop()
    with pytest.raises(ModelSourceError, match="--precision bf16 is for the PyTorch backend"):
        load_model(path, backend="onnx", precision="bf16")
    with pytest.raises(ModelSourceError, match="--precision 'fp16' needs a GPU"):  # fp16 autocast is for GPUs
        load_model(path, precision="fp16", device="cpu")
    with pytest.raises(SystemExit):  # argparse names the allowed values
        from finetune.cli import build_parser
        build_parser().parse_args(["serve", "--precision", "int8"])


def test_api_key_queue_limit_and_timeout(models):
    model = str(models["classification"][0])
    keyed = Server("--model", model, env={"FINETUNE_API_KEY": "serving-tests-k3y"})
    try:
        assert keyed.post({"inputs": ["x"]}).status_code == 401
        assert keyed.post({"inputs": ["x"]}, headers={"X-API-Key": "wrong"}).status_code == 401
        assert keyed.post({"inputs": ["x"]}, headers={"X-API-Key": "serving-tests-k3y"}).status_code == 200
        assert keyed.post({"inputs": ["x"]}, headers={"Authorization": "Bearer serving-tests-k3y"}).status_code == 200
        for route in ("/v1/model", "/metrics", "/docs", "/openapi.json", "/static-offline-docs/swagger-ui.css"):
            assert httpx.get(f"{keyed.url}{route}").status_code == 401, route
        for route in ("/", "/static/playground.js", "/static/playground.css"):  # the page asks for the key itself
            assert httpx.get(f"{keyed.url}{route}").status_code == 200, route
        assert httpx.get(f"{keyed.url}/healthz").status_code == 200 and httpx.get(f"{keyed.url}/readyz").status_code == 200
    finally:
        keyed.stop()
    small = Server("--model", model, "--max-queue", "2", "--timeout", "0.002", "--max-wait-ms", "50",
                   "--batch-wait", "fixed")
    try:
        full = small.post({"inputs": ["a", "b", "c"]})
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        slow = small.post({"inputs": ["a"]})
        assert slow.status_code == 504
        assert httpx.get(f"{small.url}/healthz").status_code == 200
    finally:
        small.stop()


def test_graceful_shutdown_finishes_requests_in_flight(models):
    server = Server("--model", str(models["classification"][0]), "--max-wait-ms", "1500", "--batch-wait", "fixed")

    async def fire_then_stop():
        async with httpx.AsyncClient(timeout=60) as client:
            tasks = [asyncio.create_task(client.post(f"{server.url}/v1/predict", json={"inputs": [f"text {i}"]}))
                     for i in range(10)]
            await asyncio.sleep(0.5)  # the requests are in, waiting for their batch
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*tasks)

    responses = asyncio.run(fire_then_stop())
    assert [r.status_code for r in responses] == [200] * 10
    # uvicorn shuts down cleanly, then re-raises the signal it caught, so the exit status is SIGTERM's.
    assert server.proc.wait(timeout=60) in (0, -signal.SIGTERM)


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=30)),
    lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(st.text(max_size=10), children, max_size=4)),
    max_leaves=20,
)
bodies = st.one_of(
    json_values,
    st.fixed_dictionaries({"inputs": json_values}),
    st.fixed_dictionaries({"inputs": st.lists(st.one_of(st.text(max_size=50), json_values), max_size=5),
                           "options": st.dictionaries(st.sampled_from(["top_k", "threshold", "truncate", "x"]), json_values, max_size=3)}),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies, content_type=st.sampled_from(["application/json", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_random_bodies_never_get_a_5xx(classifier, body, content_type):
    headers = {"content-type": content_type} if content_type else {}
    response = httpx.post(f"{classifier.url}/v1/predict", content=json.dumps(body).encode(), headers=headers, timeout=30)
    assert response.status_code < 500, (body, response.text)
    if response.status_code >= 400:
        assert response.json()["detail"], "a 4xx says why"


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=2000))
def test_random_bytes_never_get_a_5xx_and_the_server_stays_up(classifier, raw):
    response = httpx.post(f"{classifier.url}/v1/predict", content=raw, timeout=30)
    assert 400 <= response.status_code < 500 or response.status_code == 200
    assert httpx.get(f"{classifier.url}/healthz", timeout=10).status_code == 200
