"""The lean request path (issue 35): one ASGI layer before the routes (`serving.gates.Gate`), the predict routes
called without FastAPI's router, and tokenising off the event loop with concurrent requests tokenised together
(`serving.batcher.EncodeBatcher`), each input encoded exactly as alone. In process, on tiny untrained models."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import DATA

SENTENCES = [line.split("\t")[0] for line in (DATA / "sst2" / "dev.tsv").read_text(encoding="utf-8").splitlines()[1:41]]


def _predictor(path, task: str = "classification", max_length: int = 48, **settings):
    """A Predictor on a tiny untrained checkpoint (no training: the answers only need to be deterministic)."""
    import transformers
    from transformers import AutoTokenizer

    from finetune.models.modeling import ModelInfo
    from finetune.models.predictor import Predictor
    from finetune.tasks import get_task

    task_definition = get_task(task)
    model = getattr(transformers, task_definition.auto_model).from_pretrained(path, num_labels=2)
    labels = ["negative", "positive"] if task == "classification" else None
    info = ModelInfo(task=task, label_names=labels, text_pair=False, max_length=max_length, settings=settings)
    return Predictor(model, AutoTokenizer.from_pretrained(path), info, batch_size=8)


@pytest.fixture(scope="module")
def classifier(tiny_checkpoints):
    return _predictor(tiny_checkpoints["bert"])


def _same(got, want) -> None:
    assert got.owner == want.owner and got.meta == want.meta and got.truncated == want.truncated
    assert [dict(f) for f in got.features] == [dict(f) for f in want.features]


# Tokenising together, split back per request ------------------------------------------------------------------

@pytest.mark.parametrize("task,make", [
    ("classification", lambda i, text: text if i % 3 else text * 12),  # every third one truncated
    ("question_answering", lambda i, text: {"question": f"what is {i}?", "context": text * (1 + i % 4)}),  # windows
    ("multiple_choice", lambda i, text: {"context": text, "choices": ["yes", "no", "maybe"][: 2 + i % 2]}),
])
def test_inputs_encoded_together_are_split_back_exactly_as_encoded_alone(tiny_checkpoints, task, make):
    from serving.batcher import split_encoded

    predictor = _predictor(tiny_checkpoints["bert"], task, doc_stride=8)
    requests = [[make(i, text) for i, text in enumerate(SENTENCES[start:start + size], start)]
                for start, size in [(0, 3), (3, 1), (4, 5), (9, 2)]]
    together = predictor.encode_inputs([item for inputs in requests for item in inputs])
    if task == "question_answering":
        assert len(together.features) > sum(map(len, requests))  # some contexts really took several windows
    if task == "classification":
        assert any(together.truncated) and not all(together.truncated)
    for part, inputs in zip(split_encoded(together, [len(r) for r in requests]), requests):
        _same(part, predictor.encode_inputs(inputs))


def test_concurrent_requests_are_tokenised_in_one_call_off_the_event_loop(classifier):
    from serving.batcher import EncodeBatcher

    calls: list[tuple[int, str]] = []
    first_started, release_first = threading.Event(), threading.Event()

    def encode(inputs):
        calls.append((len(inputs), threading.current_thread().name))
        if len(calls) == 1:  # hold the thread on the first request, so the next ones wait together
            first_started.set()
            release_first.wait(5)
        return classifier.encode_inputs(inputs)

    async def scenario():
        done: list[int] = []
        batcher = EncodeBatcher(encode, on_done=done.append)
        first = batcher.submit([SENTENCES[0]], 10)
        await asyncio.get_running_loop().run_in_executor(None, first_started.wait, 5)
        later = [batcher.submit(SENTENCES[i:i + 2], 20) for i in range(1, 9, 2)]
        release_first.set()
        results = await asyncio.gather(first, *later)
        batcher.close()
        return results, done

    results, done = asyncio.run(scenario())
    assert [n for n, _ in calls] == [1, 8]  # the four that waited were tokenised in one call
    assert all(name.startswith("tokenise") for _, name in calls)  # on the batcher's thread, not the event loop
    assert sorted(done) == [10, 20, 20, 20, 20]  # every request's characters were released
    _same(results[0], classifier.encode_inputs([SENTENCES[0]]))
    for result, i in zip(results[1:], range(1, 9, 2)):
        _same(result, classifier.encode_inputs(SENTENCES[i:i + 2]))


def test_a_request_that_fails_the_shared_call_fails_alone_with_its_own_input_named(classifier):
    from finetune.tasks import InputError
    from serving.batcher import EncodeBatcher

    gate = threading.Event()
    seen: list[int] = []

    def encode(inputs):
        seen.append(len(inputs))
        gate.wait(5)
        return classifier.encode_inputs(inputs)

    async def scenario():
        batcher = EncodeBatcher(encode)
        busy = batcher.submit(["first"])
        waiting = [batcher.submit(["fine", "also fine"]), batcher.submit(["fine", "   "]), batcher.submit(["good"])]
        dropped = batcher.submit(["gone before its turn"])
        dropped.cancel()
        gate.set()
        results = await asyncio.gather(busy, *waiting, return_exceptions=True)
        batcher.close()
        return results

    results = asyncio.run(scenario())
    assert seen == [1, 5, 2, 2, 1]  # the shared call of three requests failed, so each was tokenised alone
    assert isinstance(results[2], InputError) and results[2].index == 1  # named within its own request
    _same(results[1], classifier.encode_inputs(["fine", "also fine"]))
    _same(results[3], classifier.encode_inputs(["good"]))


# What a batch waits for ---------------------------------------------------------------------------------------

def _recording_batcher(wait: str, max_wait: float, pass_seconds: float = 0.0):
    import time

    from serving.batcher import Batcher

    batches: list[list[str]] = []

    def run(features):
        batches.append([f["text"] for f in features])
        time.sleep(pass_seconds)
        return [len(f["text"]) for f in features]

    return Batcher(run, max_wait=max_wait, wait=wait), batches


def test_a_lone_request_goes_at_once_however_long_the_longest_wait():
    async def scenario(wait: str, max_wait: float) -> float:
        batcher, _ = _recording_batcher(wait, max_wait)
        batcher.start()
        loop = asyncio.get_running_loop()
        began = loop.time()
        (future,) = batcher.submit([{"text": "alone", "input_ids": [1]}])
        assert await asyncio.wait_for(future, 10) == 5
        took = loop.time() - began
        await batcher.stop()
        return took

    assert asyncio.run(scenario("coming", 5.0)) < 1.0  # nothing else on its way: no wait for company
    assert asyncio.run(scenario("fixed", 0.3)) >= 0.3  # the fixed wait, every time


def test_a_batch_waits_for_the_requests_on_their_way_and_no_longer():
    async def scenario():
        batcher, batches = _recording_batcher("coming", 5.0)
        batcher.start()
        loop = asyncio.get_running_loop()

        async def on_its_way(text: str, tokenising: float, arrives: bool = True):
            with batcher.coming():
                await asyncio.sleep(tokenising)
                if not arrives:  # e.g. its input was refused with a 422 after tokenising
                    return None
                (future,) = batcher.submit([{"text": text, "input_ids": [1]}])
            return await future

        # "first" is queued while "second" and "third" are being tokenised: one batch holds the three.
        coming = [asyncio.ensure_future(on_its_way("second", 0.2)), asyncio.ensure_future(on_its_way("third", 0.3))]
        await asyncio.sleep(0.05)
        began = loop.time()
        (first,) = batcher.submit([{"text": "first", "input_ids": [1]}])
        assert await asyncio.wait_for(asyncio.gather(first, *coming), 10) == [5, 6, 5]
        together = loop.time() - began
        # One on its way that never arrives: the batch waits for it, then goes without it, not after 5 s.
        never = asyncio.ensure_future(on_its_way("never", 0.2, arrives=False))
        await asyncio.sleep(0.05)
        began = loop.time()
        (alone,) = batcher.submit([{"text": "alone", "input_ids": [1]}])
        assert await asyncio.wait_for(alone, 10) == 5 and await never is None
        without = loop.time() - began
        await batcher.stop()
        return batches, together, without

    batches, together, without = asyncio.run(scenario())
    assert batches == [["first", "second", "third"], ["alone"]]
    assert 0.2 <= together < 2.0 and 0.1 <= without < 2.0


@pytest.mark.parametrize("pass_seconds,want", [
    (1.2, [["a", "b", "c"], ["d", "e", "f"]]),  # a pass longer than the wait: wait for the group to come back
    (0.0, [["a", "b", "c"], ["d"], ["e"], ["f"]]),  # a pass shorter than the wait: a second pass costs less
])
def test_after_a_long_pass_a_batch_waits_for_as_many_as_came_together(pass_seconds, want):
    async def scenario():
        batcher, batches = _recording_batcher("coming", 1.0, pass_seconds)
        batcher.start()
        await asyncio.wait_for(asyncio.gather(*batcher.submit([{"text": t, "input_ids": [1]} for t in "abc"])), 10)
        back = []
        for text in "def":  # the three clients come back one by one, well within the longest wait
            back += batcher.submit([{"text": text, "input_ids": [1]}])
            await asyncio.sleep(0.1)
        await asyncio.wait_for(asyncio.gather(*back), 10)
        await batcher.stop()
        return batches

    assert asyncio.run(scenario()) == want


def test_the_server_keeps_what_it_loaded_out_of_the_collectors_sight_while_it_serves(classifier):
    import gc

    from starlette.testclient import TestClient

    from serving.app import Settings, create_app
    from serving.loading import LoadedModel

    app = create_app(LoadedModel(classifier, "tiny", "1", None, "tiny (in process)"), Settings())
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        frozen = gc.get_freeze_count()
        assert test_client.post("/v1/predict", json={"inputs": ["fine"]}).status_code == 200
    assert frozen > 1000  # the model, the libraries: a full collection under load no longer scans them
    assert gc.get_freeze_count() == 0  # stopped: collectable again


# The app: one layer, predict routes without the router, answers as predicted ----------------------------------

@pytest.fixture
def client(classifier):
    from starlette.testclient import TestClient

    from serving.app import Settings, create_app
    from serving.loading import LoadedModel

    first = LoadedModel(classifier, "tiny", "1", None, "tiny (in process)")
    other = LoadedModel(classifier, "other", "2", None, "tiny (in process)")
    app = create_app(first, Settings(max_wait_ms=20), {"tiny": first, "other": other})
    with TestClient(app, base_url="http://127.0.0.1") as test_client:
        yield app, test_client


def test_one_layer_stands_before_the_routes(client):
    from fastapi import FastAPI

    from serving.gates import Gate

    app, _ = client
    assert type(app) is Gate and type(app.app) is FastAPI  # no chain of middlewares in between


def test_predict_answers_what_the_predictor_answers_however_requests_are_coalesced(client, classifier):
    _, test_client = client
    texts = SENTENCES[:24] + ["word " * 100]  # the last one truncated
    paths = ["/v1/predict", "/v1/models/other/predict"]  # the named route is called directly too
    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(lambda i: test_client.post(paths[i % 2], json={"inputs": [texts[i]]}),
                                  range(len(texts))))
    assert [r.status_code for r in responses] == [200] * len(texts), [r.text for r in responses]
    for response, want in zip(responses, classifier.predict(texts)):
        (got,) = response.json()["predictions"]
        assert got["label"] == want["label"] and got["truncated"] == want["truncated"]
        assert got["score"] == pytest.approx(want["score"], abs=1e-5)


@pytest.mark.parametrize("request_args,status,detail", [
    ({"content": b"{"}, 422, "json_invalid"),
    ({"json": {"inputs": ["x"], "options": {"top_k": "2"}}}, 422, ["body", "options", "top_k"]),
    ({"json": {"inputs": ["x"] * 65}}, 422, "at most 64 per request"),
    ({"json": {"inputs": ["x"]}, "path": "/v1/models/nope/predict"}, 404,
     "no model named 'nope'"),
])
def test_errors_of_the_directly_called_routes_read_as_fastapis(client, request_args, status, detail):
    _, test_client = client
    path = request_args.pop("path", "/v1/predict")
    response = test_client.post(path, **request_args)
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], list)
    assert detail in [d.get("type") for d in body["detail"]] + [d["loc"] for d in body["detail"]] or \
        detail in body["detail"][0]["msg"], body
    assert response.headers["x-content-type-options"] == "nosniff"


def test_other_methods_and_paths_still_go_through_fastapi(client):
    _, test_client = client
    assert test_client.get("/v1/predict").status_code == 405
    assert test_client.post("/v1/models/a/b/predict", json={"inputs": ["x"]}).status_code == 404
    assert test_client.post("/v1/predict/", json={"inputs": ["x"]}, follow_redirects=False).status_code == 307
    schema = test_client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/models/{name}/predict"} <= set(schema["paths"])
    options = schema["paths"]["/v1/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert set(options["properties"]["options"]["properties"]) == {"top_k", "threshold", "truncate"}
    metrics = test_client.get("/metrics").text
    assert 'finetune_requests_total{route="/v1/predict",status="405"} 1.0' in metrics


def test_a_bug_in_a_route_is_a_500_of_ours_and_counted():
    from prometheus_client import CollectorRegistry, Counter
    from starlette.testclient import TestClient

    from serving.gates import Gate

    async def broken(scope, receive, send):
        raise RuntimeError("a bug")

    registry = CollectorRegistry()
    requests = Counter("r", "r", ["route", "status"], registry=registry)
    gate = Gate(broken, requests=requests, allowed_hosts=["testserver"], max_body_bytes=100, body_timeout=1)
    response = TestClient(gate, raise_server_exceptions=False).post("/v1/predict", content=b"{}")
    assert response.status_code == 500 and response.json() == {"detail": "internal error"}
    assert response.headers["x-content-type-options"] == "nosniff"
    assert registry.get_sample_value("r_total", {"route": "/v1/predict", "status": "500"}) == 1
    assert TestClient(gate).post("/v1/predict", content=b"x" * 101).status_code == 413
    assert TestClient(gate).get("/healthz", headers={"host": "evil.example"}).status_code == 500  # probes skip Host
    assert TestClient(gate).get("/v1/model", headers={"host": "evil.example"}).status_code == 400
