"""The FastAPI application: predict, model info, health, readiness, Prometheus metrics, the playground page.

Answers come from the task definition (`TaskDefinition.postprocess`), the same code evaluation uses.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictStr, ValidationError

from finetune.tasks import InputError, PostprocessOptions
from serving.batcher import Batcher, QueueFull
from serving.loading import LoadedModel

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# The playground is a static page: it stays reachable without the API key, and asks for the key itself
# when the data it fetches (/v1/model, /v1/predict) needs one.
PLAYGROUND = {"/", "/static/playground.js", "/static/playground.css"}
OPEN_ROUTES = {"/healthz", "/readyz"} | PLAYGROUND
# Metrics are labelled by these paths only, so random URLs cannot blow up the label set.
_ROUTES = {"/v1/predict", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json"} | PLAYGROUND
# No inline script or style on the page, and nothing fetched from anywhere but this server.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@dataclass
class Settings:
    """Limits of the service; every one has a default fit for a 2-core machine."""

    max_inputs_per_request: int = 64
    max_body_bytes: int = 1_000_000
    max_batch_size: int = 16
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    max_queue: int = 512
    request_timeout_s: float = 30.0
    api_key: str | None = None


class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    top_k: int | None = Field(None, ge=1, le=1000, description="Classification: also return the k best labels.")
    threshold: float | None = Field(None, gt=0, lt=1, description="Multi-label: score at or above which a label is returned (default: the model's).")
    truncate: bool = Field(True, description="Truncate inputs longer than the model's max length (flagged `truncated`); false rejects them with 422.")


class QuestionInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    question: StrictStr
    context: StrictStr = Field(description="The text the answer is taken from; any length (read in overlapping windows).")


class ChoiceInput(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context: StrictStr
    choices: list[StrictStr] = Field(min_length=2, description="The candidate endings or answers.")
    start: StrictStr | None = Field(None, description="The beginning every choice continues (SWAG's second sentence).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"inputs": ["a gripping, beautiful film"]},
        {"inputs": [["The cat sat.", "A cat was sitting."]], "options": {"top_k": 2}},
        {"inputs": [{"question": "Where is the Eiffel Tower?", "context": "The Eiffel Tower is in Paris."}]},
        {"inputs": [{"context": "The man lit the fire.", "choices": ["It got warm.", "It started to snow."]}]},
    ]})
    inputs: list[Union[StrictStr, list[StrictStr], QuestionInput, ChoiceInput]] = Field(
        ..., min_length=1, description=(
            "Texts (classification, regression, multi-label, token classification), [text, text_pair] pairs for "
            "sentence-pair models, {question, context} for question answering, {context, choices[, start]} for "
            "multiple choice."))
    options: PredictOptions = PredictOptions()


class PredictResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "sst2-sentiment", "version": "3", "predictions": [
        {"label": "positive", "score": 0.98, "scores": {"negative": 0.02, "positive": 0.98}, "truncated": False}]}]})
    model: str
    version: str | None
    predictions: list[dict[str, Any]] = Field(description=(
        "One per input. Classification: label, score, scores (softmax over all labels), top_k if asked. "
        "Multi-label: labels over the threshold, label_scores, scores (sigmoid). Regression: value. "
        "Token classification: entities [{type, text, start, end, score}] (character offsets). "
        "Question answering: answer, start, end, score. Multiple choice: choice (index), text, score, scores. "
        "Always: truncated."))


class ModelInfoResponse(BaseModel):
    name: str
    version: str | None
    run_id: str | None
    source: str
    runtime: str = Field(description='What runs the model: "pytorch fp32", "pytorch bf16", "onnxruntime fp32" or "onnxruntime int8".')
    task: str
    text_pair: bool
    label_names: list[str] | None
    max_length: int
    threshold: float
    metrics: dict[str, float]
    sparse_attention_min_length: int | None = Field(None, description=(
        "Block-sparse BigBird: batches this many padded tokens long or longer run block-sparse attention, shorter ones "
        "full attention (the rule the model was trained and evaluated with)."))
    calibration: dict[str, Any] | None = Field(None, description=(
        "Classification and multi-label: the temperature the scores are computed with, and the expected calibration "
        "error before and after it on the evaluation split it was fitted on."))


def _inline_refs(schema: dict) -> dict:
    """A JSON schema with its local $defs substituted in place, so it stands alone inside the OpenAPI document."""
    defs = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)


def _error(status: int, field: list, message: str) -> HTTPException:
    return HTTPException(status, detail=[{"loc": field, "msg": message}])


class BodyLimit:
    """Refuse bodies over the limit with 413, by Content-Length or while streaming (chunked uploads)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        too_big = JSONResponse({"detail": f"request body over {self.limit} bytes"}, status_code=413)
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_big(scope, receive, send)
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await too_big(scope, receive, send)


class _BodyTooLarge(Exception):
    pass


class Gate:
    """API key check, request counts and latency, as plain ASGI.

    Plain ASGI rather than FastAPI's @app.middleware("http"), whose per-request task and stream
    plumbing measurably cut throughput on a 2-core machine.
    """

    def __init__(self, app, api_key: str | None, requests: Counter, latency: Histogram):
        self.app, self.requests, self.latency = app, requests, latency
        self.key = api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        path = scope["path"]
        route = path if path in _ROUTES else "other"
        if self.key is not None and path not in OPEN_ROUTES:
            headers = dict(scope["headers"])
            given = headers.get(b"x-api-key") or headers.get(b"authorization", b"").removeprefix(b"Bearer ")
            if not hmac.compare_digest(given, self.key):
                self.requests.labels(route, "401").inc()
                refused = JSONResponse({"detail": "missing or wrong API key (X-API-Key or Authorization: Bearer)"},
                                       status_code=401, headers={"WWW-Authenticate": "Bearer"})
                return await refused(scope, receive, send)
        status = {"code": 500, "sent": False}

        async def recording_send(message):
            if message["type"] == "http.response.start":
                status["code"], status["sent"] = message["status"], True
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        except Exception:  # a bug must not take the server down; report it as ours
            log.exception("unhandled error on %s", path)
            if not status["sent"]:
                await JSONResponse({"detail": "internal error"}, status_code=500)(scope, receive, send)
        finally:
            self.requests.labels(route, str(status["code"])).inc()
            self.latency.labels(route).observe(time.perf_counter() - started)


def _named(models: dict[str, LoadedModel], name: str) -> LoadedModel:
    if name not in models:
        known = ", ".join(models) or "none (the server was started with one unnamed --model; use /v1/predict)"
        raise _error(404, ["path", "name"], f"no model named {name!r}; served here: {known}")
    return models[name]


def _model_info_response(name: str, loaded: LoadedModel) -> ModelInfoResponse:
    info = loaded.predictor.info
    return ModelInfoResponse(
        name=name, version=loaded.version, run_id=loaded.run_id, source=loaded.source,
        runtime=loaded.predictor.runtime, task=info.task, text_pair=info.text_pair, label_names=info.label_names,
        max_length=info.max_length, threshold=info.threshold, metrics=info.metrics,
        sparse_attention_min_length=info.sparse_attention_min_length, calibration=info.calibration)


async def _start_named_batchers(models: dict[str, LoadedModel], first: LoadedModel, first_batcher: Batcher,
                                settings: Settings, batch_sizes: Histogram) -> dict[str, Batcher]:
    """One batcher per named model (the first model's is /v1/predict's), each warmed up with one batch."""
    batchers: dict[str, Batcher] = {}
    for name, loaded in models.items():
        if loaded is first:
            batchers[name] = first_batcher
            continue
        loaded.predictor.batch_size = settings.max_batch_size
        batcher = Batcher(loaded.predictor.outputs, max_batch_size=settings.max_batch_size,
                          max_batch_tokens=settings.max_batch_tokens, max_wait=settings.max_wait_ms / 1000,
                          max_queue=settings.max_queue, on_batch=batch_sizes.observe)
        batcher.start()
        batchers[name] = batcher
        predictor = loaded.predictor
        warm = predictor.encode_inputs([predictor.task.example_input(predictor.info.text_pair)])
        await asyncio.wait_for(asyncio.gather(*batcher.submit(warm.features)), timeout=600)
    return batchers


async def _answer(loaded: LoadedModel, batcher: Batcher, raw: bytes, settings: Settings) -> JSONResponse:
    """A /v1/models/{name}/predict request, checked and answered as /v1/predict answers the default model's."""
    predictor, info = loaded.predictor, loaded.predictor.info
    try:
        body = PredictRequest.model_validate_json(raw)
    except ValidationError as e:
        detail = [{"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]} for e_ in e.errors()]
        raise HTTPException(422, detail=detail) from None
    if len(body.inputs) > settings.max_inputs_per_request:
        raise _error(422, ["body", "inputs"], f"{len(body.inputs)} inputs; at most {settings.max_inputs_per_request} per request")
    inputs = [item.model_dump(exclude_none=True) if isinstance(item, BaseModel) else item for item in body.inputs]
    try:
        encoded = predictor.encode_inputs(inputs)
    except InputError as e:
        raise _error(422, ["body", "inputs", e.index], str(e)) from None
    if not body.options.truncate:
        too_long = [i for i, t in enumerate(encoded.truncated) if t]
        if too_long:
            raise _error(422, ["body", "inputs", too_long[0]],
                         f"longer than the {info.max_length} tokens this model reads (or set options.truncate)")
    try:
        futures = batcher.submit(encoded.features)
    except QueueFull as e:
        raise HTTPException(503, detail=f"busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
    try:
        rows = await asyncio.wait_for(asyncio.gather(*futures), timeout=settings.request_timeout_s)
    except asyncio.TimeoutError:
        for f in futures:
            f.cancel()
        raise HTTPException(504, detail=f"no answer within {settings.request_timeout_s:.0f} s") from None
    options = PostprocessOptions(threshold=body.options.threshold if body.options.threshold is not None else info.threshold,
                                 top_k=body.options.top_k)
    answers = predictor.answer(inputs, encoded, rows, options)
    return JSONResponse({"model": loaded.name, "version": loaded.version, "predictions": answers})


def create_app(model: LoadedModel, settings: Settings | None = None,
               models: dict[str, LoadedModel] | None = None) -> FastAPI:
    """Build the service around a loaded model.

    `models` (`finetune serve --model NAME=SOURCE ...`): every model by name, `model` being the first; each answers
    at /v1/models/{name}/predict with its own batcher, and /v1/predict and /v1/model stay the first model's.
    """
    settings = settings or Settings()
    models = models or {}
    predictor = model.predictor
    predictor.batch_size = settings.max_batch_size
    info = predictor.info
    registry = CollectorRegistry()
    requests = Counter("finetune_requests_total", "HTTP requests by route and status", ["route", "status"], registry=registry)
    latency = Histogram("finetune_request_latency_seconds", "Request latency by route", ["route"], registry=registry,
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch_sizes = Histogram("finetune_batch_size", "Inputs per model forward pass", registry=registry,
                            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
    queue_depth = Gauge("finetune_queue_depth", "Inputs waiting for a batch", registry=registry)
    state: dict[str, Any] = {"ready": False}

    def run_batch(features: list[dict]) -> list[np.ndarray]:
        return predictor.outputs(features)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher = Batcher(run_batch, max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                          max_wait=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                          on_batch=batch_sizes.observe)
        batcher.start()
        state["batcher"] = batcher
        queue_depth.set_function(lambda: batcher.depth)
        warm = predictor.encode_inputs([predictor.task.example_input(info.text_pair)])
        await asyncio.wait_for(asyncio.gather(*batcher.submit(warm.features)), timeout=600)
        state["batchers"] = await _start_named_batchers(models, model, batcher, settings, batch_sizes)
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()  # finishes whatever requests are still waiting
        for named in state["batchers"].values():
            if named is not batcher:
                await named.stop()

    # FastAPIOffline: FastAPI with /docs and /redoc loading their JavaScript and CSS from this server (the
    # package ships Swagger UI and ReDoc), not from a CDN, so the docs work offline and do not change under us.
    app = FastAPIOffline(title="finetune inference", version="1", lifespan=lifespan,
                         description=f"Serves {model.name} ({info.task}{', sentence pairs' if info.text_pair else ''}).")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """A page to try the model by hand; it calls /v1/model and /v1/predict like any client."""
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/v1/predict", response_model=PredictResponse, responses={
        401: {"description": "missing or wrong API key"}, 413: {"description": "body too large"},
        422: {"description": "invalid inputs, named by field"}, 503: {"description": "queue full; retry after Retry-After seconds"},
        504: {"description": "request timed out"}},
        # The body is parsed by hand (below) so `curl -d '{...}'`, which sends a form content type, works too;
        # the schema is declared here so /docs still shows it (FastAPI's documented pattern for this).
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline_refs(PredictRequest.model_json_schema())}}}})
    async def predict(request: Request) -> JSONResponse:
        """Predict for a list of inputs (texts, or [text, text_pair] pairs for pair models)."""
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as e:
            detail = [{"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]} for e_ in e.errors()]
            raise HTTPException(422, detail=detail) from None
        if len(body.inputs) > settings.max_inputs_per_request:
            raise _error(422, ["body", "inputs"], f"{len(body.inputs)} inputs; at most {settings.max_inputs_per_request} per request")
        inputs = [item.model_dump(exclude_none=True) if isinstance(item, BaseModel) else item for item in body.inputs]
        try:
            encoded = predictor.encode_inputs(inputs)
        except InputError as e:
            raise _error(422, ["body", "inputs", e.index], str(e)) from None
        if not body.options.truncate:
            too_long = [i for i, t in enumerate(encoded.truncated) if t]
            if too_long:
                raise _error(422, ["body", "inputs", too_long[0]],
                             f"longer than the {info.max_length} tokens this model reads (or set options.truncate)")
        try:
            futures = state["batcher"].submit(encoded.features)
        except QueueFull as e:
            raise HTTPException(503, detail=f"busy: {e}; retry shortly", headers={"Retry-After": "1"}) from None
        try:
            rows = await asyncio.wait_for(asyncio.gather(*futures), timeout=settings.request_timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            raise HTTPException(504, detail=f"no answer within {settings.request_timeout_s:.0f} s") from None
        options = PostprocessOptions(
            threshold=body.options.threshold if body.options.threshold is not None else info.threshold,
            top_k=body.options.top_k,
        )
        answers = predictor.answer(inputs, encoded, rows, options)
        # Returned as a ready response: the answers are built by the task definition already, and FastAPI's
        # re-validation of them against PredictResponse (still the documented schema) costs throughput.
        return JSONResponse({"model": model.name, "version": model.version, "predictions": answers})

    @app.get("/v1/model", response_model=ModelInfoResponse)
    async def model_info() -> ModelInfoResponse:
        """What is being served, and the evaluation metrics it was chosen on."""
        return ModelInfoResponse(
            name=model.name, version=model.version, run_id=model.run_id, source=model.source,
            runtime=predictor.runtime, task=info.task,
            text_pair=info.text_pair, label_names=info.label_names, max_length=info.max_length,
            threshold=info.threshold, metrics=info.metrics,
            sparse_attention_min_length=info.sparse_attention_min_length, calibration=info.calibration,
        )

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The models this server answers for by name (`finetune serve --model NAME=SOURCE ...`); the first is also
        /v1/predict's."""
        return {"default": next(iter(models), None), "models": [
            _model_info_response(name, m).model_dump() for name, m in models.items()]}

    @app.get("/v1/models/{name}", response_model=ModelInfoResponse)
    async def named_model_info(name: str) -> ModelInfoResponse:
        """What one named model is, as /v1/model says it of the default one."""
        return _model_info_response(name, _named(models, name))

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, responses={
        404: {"description": "no model of that name"}, 422: {"description": "invalid inputs, named by field"},
        503: {"description": "queue full"}, 504: {"description": "request timed out"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline_refs(PredictRequest.model_json_schema())}}}})
    async def named_predict(name: str, request: Request) -> JSONResponse:
        """Predict with one named model; the body and answers are /v1/predict's."""
        chosen = _named(models, name)
        return await _answer(chosen, state["batchers"][name], await request.body(), settings)

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Alive (the process answers)."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        """Ready once the model is loaded and a warm-up batch has run."""
        if not state["ready"]:
            return JSONResponse({"status": "loading"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        """Prometheus metrics."""
        return PlainTextResponse(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return Gate(BodyLimit(app, settings.max_body_bytes), settings.api_key, requests, latency)
