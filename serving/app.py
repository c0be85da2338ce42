"""The FastAPI application: predict, model info, health, readiness, Prometheus metrics, the playground page.

Answers come from the task definition (`TaskDefinition.postprocess`), the same code evaluation uses.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import logging
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import fastapi_offline
import regex
from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from finetune.files import MAX_INPUT_CHARS
from finetune.tasks import InputError, PostprocessOptions
from finetune.threads import ThreadBudget
from serving.batcher import Batcher, EncodeBatcher, QueueFull
from serving.gates import DOCS_POLICY, LOOPBACK_NAMES, PAGE_POLICY, Gate, client_gone
from serving.loading import LoadedModel, sharing_line

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"
# Swagger UI's and ReDoc's JavaScript and CSS, shipped in the fastapi_offline package: served from here, not a CDN,
# so the docs work offline, do not change under us, and fit a CSP that allows this server's scripts only.
DOCS_ASSETS = Path(fastapi_offline.__file__).parent / "static"
# The OpenAPI document's title and description are fixed text: ReDoc renders the description as Markdown with
# HTML, so nothing read from a model folder or the registry (a model's name, its labels) may reach it.
TITLE = "finetune inference"
DESCRIPTION = ("Predictions of fine-tuned models. What is served (name, version, task, labels, metrics) is at "
               "GET /v1/model and GET /v1/models; the playground is at /.")
_PAGE_HEADERS = {"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-cache"}
_DOCS_HEADERS = {"Content-Security-Policy": DOCS_POLICY, "Cache-Control": "no-cache"}
# Lanes by request size: requests up to LARGE_REQUEST_CHARS are tokenised together in one thread (`Lanes`), larger
# ones one by one in another. Post-processing, pure Python, runs on the event loop for requests up to INLINE_CHARS,
# where a thread hop would cost more than the work, else in the request's lane.
INLINE_CHARS = 2_000
LARGE_REQUEST_CHARS = 20_000
# A character a reader would see: anything but whitespace, control and format characters (zero-width
# spaces, joiners, direction marks, BOM), code points Unicode says to render as nothing (fillers, variation
# selectors, tags) and combining marks with nothing to combine with. An input with none of them is empty.
_VISIBLE = regex.compile(r"[^\s\p{Z}\p{Cc}\p{Cf}\p{Cs}\p{Mn}\p{Me}\p{Default_Ignorable_Code_Point}\u2800]")


@dataclass
class Settings:
    """Limits of the service; every one has a default fit for a 2-core machine."""

    max_inputs_per_request: int = 64
    max_body_bytes: int = 1_000_000
    max_batch_size: int = 16
    max_batch_tokens: int = 8192
    max_wait_ms: float = 5.0
    # What a batch waits for, for at most max_wait_ms: "coming", requests already being read and tokenised (a lone
    # request goes at once); "fixed", max_wait_ms before every batch (serving.batcher).
    batch_wait: Literal["coming", "fixed"] = "coming"
    max_queue: int = 512
    request_timeout_s: float = 30.0
    api_key: str | None = None
    max_input_chars: int = MAX_INPUT_CHARS  # per input, all its texts together; checked before tokenising
    # Characters accepted for tokenising but not yet tokenised (one thread does it); beyond, requests get 503.
    max_pending_chars: int = 4_000_000
    body_timeout_s: float = 30.0
    allowed_hosts: list[str] = field(default_factory=lambda: list(LOOPBACK_NAMES))
    allowed_origins: list[str] = field(default_factory=list)
    # PyTorch intra-op threads; None: automatic, following the CPUs this process may use and other load on them.
    threads: int | None = None


# Strict: `top_k: "2"`, `top_k: true` or `truncate: "yes"` are mistakes to name, not values to guess at.
class PredictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    top_k: StrictInt | None = Field(None, ge=1, le=1000, description="Classification: also return the k best labels.")
    threshold: StrictFloat | None = Field(None, gt=0, lt=1, description="Multi-label: score at or above which a label is returned (default: the model's).")
    truncate: StrictBool = Field(True, description="Truncate inputs longer than the model's max length (flagged `truncated`); false rejects them with 422.")


class QuestionInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    question: StrictStr
    context: StrictStr = Field(description="The text the answer is taken from; any length (read in overlapping windows).")


class ChoiceInput(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    context: StrictStr
    choices: list[StrictStr] = Field(min_length=2, description="The candidate endings or answers.")
    start: StrictStr | None = Field(None, description="The beginning every choice continues (SWAG's second sentence).")


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"examples": [
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
    # A factory, not a PredictOptions() default, which pydantic would deep-copy for every request; the schema still
    # shows the default.
    options: PredictOptions = Field(default_factory=PredictOptions,
                                    json_schema_extra={"default": {"top_k": None, "threshold": None, "truncate": True}})


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


def _failed(stage: str, error: BaseException, index: int | None = None) -> HTTPException:
    """500 for one request whose inputs made the model or its post-processing fail: the stage and the error's kind,
    never its text (which may hold paths or data); the server log has the rest."""
    where = ["body", "inputs"] + ([index] if index is not None else [])
    return _error(500, where, f"{stage} failed on {'this input' if index is not None else 'these inputs'} "
                              f"({type(error).__name__}); other requests are not affected, and the server log says more")


def _texts(item) -> list[tuple[list, str]]:
    """(location within the input, text) for every text of one input (a text, a pair, or a QA/choice dict)."""
    if isinstance(item, str):
        return [([], item)]
    found: list[tuple[list, str]] = []
    for key, value in (enumerate(item) if isinstance(item, list) else item.items()):
        if isinstance(value, list):
            found += [([key, j], text) for j, text in enumerate(value)]
        else:
            found.append(([key], value))
    return found


def check_texts(inputs: list, max_chars: int) -> int:
    """The characters of all inputs; HTTPException 422 naming the first input over `max_chars` characters or
    with a text that shows nothing (only whitespace, control or zero-width characters)."""
    total = 0
    for i, item in enumerate(inputs):
        texts = _texts(item)
        chars = sum(len(t) for _, t in texts)
        if chars > max_chars:
            raise _error(422, ["body", "inputs", i], f"{chars} characters; at most {max_chars} per input")
        for where, text in texts:
            if text and not _VISIBLE.search(text):  # empty ones are the task definition's to name
                raise _error(422, ["body", "inputs", i, *where],
                             "no visible characters (only whitespace, control or zero-width characters)")
        total += chars
    return total


class PendingChars:
    """Characters accepted for tokenising and not yet tokenised, for every model together; past `limit`, requests
    get 503 before their text is queued."""

    def __init__(self, limit: int):
        self.limit, self.count = limit, 0

    def take(self, chars: int) -> None:
        if self.count + chars > self.limit:
            raise HTTPException(503, detail=f"busy: {self.count} characters are waiting to be tokenised "
                                            f"(limit {self.limit}); retry shortly", headers={"Retry-After": "1"})
        self.count += chars

    def release(self, chars: int) -> None:
        self.count -= chars


class Lanes:
    """Where one model's requests are tokenised and post-processed, off the event loop, in two lanes by size so that
    short requests never queue behind megabytes of text (a 1 MB text takes a second to tokenise): requests up to
    LARGE_REQUEST_CHARS are tokenised together (`EncodeBatcher`: one tokenizer call for all that arrived meanwhile)
    in one thread, larger ones one at a time in another. Each thread has its own tokenizer: a fast tokenizer must
    not be used by two threads at once (the inference thread never calls it; its collator pads in Python). Both go
    through `Predictor.encode_inputs`, the one tokenisation every path uses.

    Models whose inputs encode alike (one `Predictor.encoding_key`: adapters of one base sharing forward passes)
    share one Lanes: their requests are tokenised together, and each gets its own post-processing (`answer` is
    given the model's predictor; the task definitions' post-processing never calls the tokenizer)."""

    def __init__(self, predictor: Any, pending: PendingChars):
        self.pending = pending
        small, self.large_predictor = self._own_tokenizer(predictor), self._own_tokenizer(predictor)
        self.small = EncodeBatcher(small.encode_inputs, on_done=pending.release, thread_name="tokenise")
        self.large = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenise-large")

    @staticmethod
    def _own_tokenizer(predictor: Any) -> Any:
        copied = copy.copy(predictor)
        copied.tokenizer = copy.deepcopy(predictor.tokenizer)
        return copied

    async def encode(self, inputs: list, chars: int) -> Any:
        """The inputs' `Encoded`; 503 (HTTPException) when too many characters are waiting already."""
        self.pending.take(chars)
        if chars <= LARGE_REQUEST_CHARS:
            return await self.small.submit(inputs, chars)  # cancelling it drops the request if it has not started
        loop = asyncio.get_running_loop()
        try:
            job = self.large.submit(self.large_predictor.encode_inputs, inputs)
        except BaseException:
            self.pending.release(chars)
            raise
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self.pending.release, chars))
        return await asyncio.wrap_future(job)  # cancelling it drops the job if it has not started

    async def answer(self, predictor: Any, chars: int, inputs: list, encoded: Any, rows: list,
                     options: PostprocessOptions) -> list:
        """The model's `Predictor.answer`, on the event loop for a request up to INLINE_CHARS, else in the request's
        lane."""
        if chars <= INLINE_CHARS:
            return predictor.answer(inputs, encoded, rows, options)
        executor = self.small.executor if chars <= LARGE_REQUEST_CHARS else self.large
        return await asyncio.wrap_future(executor.submit(predictor.answer, inputs, encoded, rows, options))

    def close(self) -> None:
        """Stop both threads once the work given to them is done."""
        self.small.close()
        self.large.shutdown(wait=True)


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


def create_app(model: LoadedModel, settings: Settings | None = None,
               models: dict[str, LoadedModel] | None = None) -> FastAPI:
    """Build the service around a loaded model.

    `models` (`finetune serve --model NAME=SOURCE ...`): every model by name, `model` being the first; each answers
    at /v1/models/{name}/predict with its own batcher and tokenising lanes (LoRA adapters of one base that can share
    forward passes, `LoadedModel.shared`, share one batcher), and /v1/predict and /v1/model stay the first model's.
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
    pending = PendingChars(settings.max_pending_chars)

    threads = ThreadBudget(settings.threads)
    for loaded in [model, *models.values()]:
        loaded.predictor.threads = threads  # one budget for every model's batches (Predictor.outputs applies it)

    def lanes_for(loaded: LoadedModel) -> Lanes:
        """A model's tokenising lanes: its own, or for adapters sharing forward passes whose inputs encode alike,
        the one set they share (one count of waiting characters for every model either way)."""
        key = loaded.predictor.encoding_key() if loaded.shared is not None else None
        if key is None:
            return Lanes(loaded.predictor, pending)
        key = f"{id(loaded.shared)}:{key}"
        if key not in state["shared_lanes"]:
            state["shared_lanes"][key] = Lanes(loaded.predictor, pending)
        return state["shared_lanes"][key]

    def new_batcher(run, tagged: bool = False) -> Batcher:
        batcher = Batcher(run, max_batch_size=settings.max_batch_size, max_batch_tokens=settings.max_batch_tokens,
                          max_wait=settings.max_wait_ms / 1000, max_queue=settings.max_queue,
                          on_batch=batch_sizes.observe, tagged=tagged, wait=settings.batch_wait)
        batcher.start()
        state["batchers"].append(batcher)
        return batcher

    def batcher_for(loaded: LoadedModel, run) -> Any:
        """A model's own batcher running `run`, or for adapters that share forward passes (`loaded.shared`, see
        serving.loading.share_passes) their one batcher, which runs each batch once, every input with its model's
        adapter (Predictor.outputs applies the thread budget there too)."""
        group = loaded.shared
        if group is None:
            return new_batcher(run)
        if id(group) not in state["shared"]:
            group.lead.batch_size = settings.max_batch_size
            state["shared"][id(group)] = new_batcher(group.outputs, tagged=True)
            log.info(sharing_line(group))
        return state["shared"][id(group)].for_tag(loaded.name)

    async def warm(batcher: Any, model_predictor: Any) -> None:
        """One pass of the model's example input through its batcher before /readyz says ready, so the first user
        request does not pay the first pass's one-time costs."""
        await asyncio.wait_for(asyncio.gather(*batcher.submit(model_predictor.example_features())), timeout=600)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state["batchers"], state["shared"], state["shared_lanes"] = [], {}, {}  # adapters' shared ones by group
        batcher = batcher_for(model, predictor.outputs)
        state["batcher"] = batcher
        state["lanes"] = lanes_for(model)
        queue_depth.set_function(lambda: batcher.depth)
        await warm(batcher, predictor)
        # Every named model answers through its own lanes and batcher (adapters sharing passes: their one batcher);
        # the first is /v1/predict's.
        state["units"] = {}
        for name, loaded in models.items():
            if loaded is model:
                state["units"][name] = {"model": model, "batcher": batcher, "lanes": state["lanes"]}
                continue
            loaded.predictor.batch_size = settings.max_batch_size
            unit = {"model": loaded, "batcher": batcher_for(loaded, loaded.predictor.outputs),
                    "lanes": lanes_for(loaded)}
            state["units"][name] = unit
            await warm(unit["batcher"], loaded.predictor)
        # Everything loaded so far (the models, the libraries) lives as long as the server: out of the collector's
        # sight, a full collection scans only what requests left, not millions of long-lived objects. Under load one
        # came every 2 s and stopped the event loop for 220-270 ms: the p99 at 64 clients (bench/serve_ceiling.py).
        gc.collect()
        gc.freeze()
        state["ready"] = True
        yield
        state["ready"] = False
        gc.unfreeze()  # an in-process server (tests, notebooks) leaves its objects collectable again
        for started in state["batchers"]:
            await started.stop()  # finishes whatever requests are still waiting
        every = [state["lanes"], *(unit["lanes"] for unit in state["units"].values())]
        for lanes in {id(lanes): lanes for lanes in every}.values():  # shared lanes once
            lanes.close()
        threads.close()

    async def answer(body: PredictRequest, inputs: list, chars: int, unit: dict | None = None) -> JSONResponse:
        """Answer checked inputs with the first model, or with a named model's `unit` (its model, batcher, lanes)."""
        served = unit["model"] if unit else model
        info, lanes = served.predictor.info, unit["lanes"] if unit else state["lanes"]
        batcher = unit["batcher"] if unit else state["batcher"]
        with batcher.coming():  # a batch that has begun waits for this request (serving.batcher)
            try:
                encoded = await lanes.encode(inputs, chars)
            except InputError as e:
                raise _error(422, ["body", "inputs", e.index], str(e)) from None
            except HTTPException:
                raise
            except Exception as e:  # the tokenizer choked on something the checks let through: this request only
                log.exception("tokenising a request's inputs failed for %r", served.name)
                raise _failed("tokenising the inputs", e) from None
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
            # asyncio.wait, not gather: a request cancelled meanwhile (its client left) leaves no gathering future
            # behind whose CancelledError asyncio would print as "exception was never retrieved".
            _, pending = await asyncio.wait(futures, timeout=settings.request_timeout_s)
        finally:
            for f in futures:  # timed out, or the client left: the batcher skips what is still queued
                f.cancel()
        if pending:
            raise HTTPException(504, detail=f"no answer within {settings.request_timeout_s:g} s")
        for i, f in enumerate(futures):  # the model failed on these inputs alone (serving.batcher)
            if f.exception() is not None:
                raise _failed("running the model", f.exception(), i)
        rows = [f.result() for f in futures]
        options = PostprocessOptions(
            threshold=body.options.threshold if body.options.threshold is not None else info.threshold,
            top_k=body.options.top_k,
        )
        try:
            answers = await lanes.answer(served.predictor, chars, inputs, encoded, rows, options)
        except HTTPException:
            raise
        except Exception as e:  # e.g. a label list that does not fit the model's outputs
            log.exception("reading the model's outputs failed for %r", served.name)
            raise _failed("reading the model's outputs", e) from None
        # Returned as a ready response: the answers are built by the task definition already, and FastAPI's
        # re-validation of them against PredictResponse (still the documented schema) costs throughput.
        return JSONResponse({"model": served.name, "version": served.version, "predictions": answers})

    # /docs and /redoc are static pages of ours (no inline script: docs.js starts Swagger UI) around the assets
    # fastapi_offline ships; FastAPI's own pages would inline the start-up script, which the CSP forbids.
    app = FastAPI(title=TITLE, version="1", lifespan=lifespan, description=DESCRIPTION, docs_url=None,
                  redoc_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/static-offline-docs", StaticFiles(directory=DOCS_ASSETS), name="static-offline-docs")

    @app.get("/", include_in_schema=False)
    async def playground() -> FileResponse:
        """A page to try the model by hand; it calls /v1/model and /v1/predict like any client."""
        return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> FileResponse:
        """Swagger UI on this server's OpenAPI document."""
        return FileResponse(STATIC / "docs.html", headers=_DOCS_HEADERS)

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> FileResponse:
        """ReDoc on this server's OpenAPI document."""
        return FileResponse(STATIC / "redoc.html", headers=_DOCS_HEADERS)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        detail = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.post("/v1/predict", response_model=PredictResponse, responses={
        401: {"description": "missing or wrong API key"}, 408: {"description": "body not received in time"},
        413: {"description": "body too large"}, 422: {"description": "invalid inputs, named by field"},
        503: {"description": "queue full; retry after Retry-After seconds"}, 504: {"description": "request timed out"}},
        # The body is parsed by hand (below) so `curl -d '{...}'`, which sends a form content type, works too;
        # the schema is declared here so /docs still shows it (FastAPI's documented pattern for this).
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline_refs(PredictRequest.model_json_schema())}}}})
    async def predict(request: Request) -> JSONResponse:
        """Predict for a list of inputs (texts, or [text, text_pair] pairs for pair models)."""
        return await handle(request)

    async def handle(request: Request, unit: dict | None = None) -> JSONResponse:
        """A predict request for the first model, or for a named model's `unit`."""
        try:
            body = PredictRequest.model_validate_json(await request.body())
        except ValidationError as e:
            detail = [{"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]} for e_ in e.errors()]
            raise HTTPException(422, detail=detail) from None
        if len(body.inputs) > settings.max_inputs_per_request:
            raise _error(422, ["body", "inputs"], f"{len(body.inputs)} inputs; at most {settings.max_inputs_per_request} per request")
        inputs = [item.model_dump(exclude_none=True) if isinstance(item, BaseModel) else item for item in body.inputs]
        chars = check_texts(inputs, settings.max_input_chars)
        # The body has been read (serving.gates.Gate), so the next message from the client is http.disconnect: if
        # it comes before the answer, the client has gone, this request is cancelled and its inputs are dropped.
        # One watching task that cancels this one, rather than the answer in a task of its own raced against it:
        # a task and a wait less for every request.
        this, left = asyncio.current_task(), []

        def client_left(gone: asyncio.Task) -> None:
            if not gone.cancelled() and gone.exception() is None and gone.result()["type"] == "http.disconnect":
                left.append(True)
                this.cancel()

        gone = asyncio.ensure_future(request.receive())
        gone.add_done_callback(client_left)
        try:
            return await answer(body, inputs, chars, unit)
        except asyncio.CancelledError:
            if not left:
                raise  # the server is stopping
            this.uncancel()
            return client_gone(request.scope, "while waiting for the answer")
        finally:
            gone.remove_done_callback(client_left)
            gone.cancel()

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
        """What one named model is, as /v1/model says it of the first one."""
        return _model_info_response(name, _named(models, name))

    @app.post("/v1/models/{name}/predict", response_model=PredictResponse, responses={
        404: {"description": "no model of that name"}, 408: {"description": "body not received in time"},
        413: {"description": "body too large"}, 422: {"description": "invalid inputs, named by field"},
        503: {"description": "queue full; retry after Retry-After seconds"}, 504: {"description": "request timed out"}},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": _inline_refs(PredictRequest.model_json_schema())}}}})
    async def named_predict(name: str, request: Request) -> JSONResponse:
        """Predict with one named model; the body, limits and answers are /v1/predict's."""
        _named(models, name)
        return await handle(request, state["units"][name])

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

    def direct(scope: dict):
        """The predict routes' endpoints for the gate to call itself (see `call_endpoint`); None for any other
        request, which FastAPI's router takes."""
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        if path == "/v1/predict":
            return lambda scope, receive, send: call_endpoint(predict, scope, receive, send)
        if path.startswith("/v1/models/") and path.endswith("/predict"):
            name = path[len("/v1/models/"):-len("/predict")]  # as FastAPI matches /v1/models/{name}/predict
            if name and "/" not in name:
                return lambda scope, receive, send: call_endpoint(named_predict, scope, receive, send, name)
        return None

    async def call_endpoint(endpoint, scope, receive, send, *args) -> None:
        """A route's endpoint called as FastAPI calls it (a Request in, a response or an HTTPException out), without
        the router, dependency solving and exception middlewares around it, which cost more CPU than the rest
        of a short prediction together (bench/serve_ceiling.py). The routes stay declared above, so /openapi.json
        and /docs document them as before."""
        request = Request(scope, receive)
        try:
            response = await endpoint(*args, request)
        except HTTPException as e:
            response = await http_exception_handler(request, e)  # FastAPI's own rendering of it
        await response(scope, receive, send)

    return Gate(app, requests=requests, latency=latency, allowed_hosts=settings.allowed_hosts,
                allowed_origins=settings.allowed_origins, api_key=settings.api_key,
                max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout_s, direct=direct)
