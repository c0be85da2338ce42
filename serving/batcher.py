"""Dynamic batching: inputs of concurrent requests share forward passes.

Requests put their inputs on a bounded queue and await one future per input. A single worker task
takes the first waiting input, gathers more until the batch is full (by count, or by padded tokens:
longest input x batch size) or the wait for company ends, and runs the model in a worker thread, so the
event loop never blocks on inference. Written here because no maintained library does request
coalescing for an in-process PyTorch model inside FastAPI without a separate server.

The wait for company (`wait`), at most `max_wait` seconds: "coming" (the default) waits for requests known
to be on their way (read and being tokenised: `Batcher.coming`) and, when the last pass took `max_wait` or
longer, until as many inputs as recent batches held are waiting (clients answered together come back
together): a lone request goes at once, and a busy server's batches stay whole. "fixed" waits `max_wait`
before every batch. A fixed 5 ms wait was a third of every request's time at 16 clients with a model
answering at once (bench/serve_ceiling.py); without the second rule, 16 clients coming back to a 3-layer
MiniLM were cut into two passes, the first run before the others were read (mean batch 10-11 inputs, up
to 10% fewer requests/s than the fixed wait).

Tokenising is coalesced the same way (`EncodeBatcher`): the requests that arrive while one tokenizer call runs
are tokenised together in the next, on a thread of its own.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import dataclasses
import itertools
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

from finetune.tasks import Encoded

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More inputs are waiting than the queue may hold; the caller should retry later."""


@dataclass
class Item:
    features: dict  # the encoded input (input_ids, attention_mask, ...), truncated to the model's length
    future: asyncio.Future = field(repr=False)
    tag: Any = None  # which model the input is for, in a batcher that runs several (`Batcher.tagged`)

    @property
    def length(self) -> int:
        ids = self.features["input_ids"]
        # A multiple-choice feature holds its choices' token lists; the batch pads to the longest.
        return max(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


class Batcher:
    """Coalesce single inputs into batches and run them off the event loop."""

    def __init__(self, run_batch: Callable[[list[dict]], np.ndarray], *, max_batch_size: int = 32,
                 max_batch_tokens: int = 8192, max_wait: float = 0.005, max_queue: int = 512,
                 on_batch: Callable[[int], None] | None = None, tagged: bool = False,
                 wait: Literal["coming", "fixed"] = "coming"):
        """tagged: inputs carry a tag (`submit(items, tag)`, `for_tag`), and `run_batch(features, tags)` gets each
        input's tag too: several models sharing one forward pass per batch (`finetune.models.adapters.SharedAdapters`).
        wait: what a batch waits for, for at most `max_wait` seconds (the module's docstring)."""
        if wait not in ("coming", "fixed"):
            raise ValueError(f"wait must be 'coming' or 'fixed', not {wait!r}")
        self.run_batch = run_batch
        self.wait = wait
        self.tagged = tagged
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait
        self.max_queue = max_queue
        self.on_batch = on_batch
        self._pending: collections.deque[Item] = collections.deque()
        self._wakeup = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._closing = False
        self._coming = 0  # requests on their way (`coming`)
        self._sizes = collections.deque([0, 0], maxlen=2)  # inputs in the last two batches
        self._last_pass = 0.0  # seconds the last batch's pass took
        self._gathering = False  # the worker waits for company (`_wait_for_company`)

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch."""
        return len(self._pending)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish every queued input, then stop the worker."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    def for_tag(self, tag: Any) -> "TaggedSubmitter":
        """What one model of a tagged batcher submits its inputs through."""
        return TaggedSubmitter(self, tag)

    @contextlib.contextmanager
    def coming(self) -> Iterator[None]:
        """Around a request's way to `submit` (tokenising, checks): while it is on its way, a batch that has begun
        waits for it (at most `max_wait`), so the requests that arrived together share a pass."""
        self._coming += 1
        try:
            yield
        finally:
            self._coming -= 1
            self._arrived()  # a batch waiting for it, if it never came, need not wait any more

    def submit(self, items: list[dict], tag: Any = None) -> list[asyncio.Future]:
        """Queue encoded inputs (with their model's `tag` in a tagged batcher); all or none, never past max_queue."""
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self._pending) + len(items) > self.max_queue:
            raise QueueFull(f"{len(self._pending)} inputs are already waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = []
        for features in items:
            item = Item(features, loop.create_future(), tag)
            self._pending.append(item)
            futures.append(item.future)
        self._arrived()
        return futures

    def _take_batch(self) -> list[Item]:
        batch: list[Item] = []
        longest = 0
        while self._pending and len(batch) < self.max_batch_size:
            item = self._pending[0]
            if item.future.done():  # its request timed out or went away: skip the work
                self._pending.popleft()
                continue
            longest_if_added = max(longest, item.length)
            if batch and longest_if_added * (len(batch) + 1) > self.max_batch_tokens:
                break
            batch.append(self._pending.popleft())
            longest = longest_if_added
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            await self._wait_for_company()
            batch = self._take_batch()
            if not batch:
                continue
            began = loop.time()
            try:
                logits = await self._run(loop, batch)
            except Exception as e:  # never the worker: the failing inputs fail, their batch-mates are answered
                if len(batch) == 1:
                    self._fail(batch[0], e)
                else:
                    await self._one_by_one(loop, batch)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for item, row in zip(batch, logits):
                if not item.future.done():
                    item.future.set_result(row)
            self._sizes.append(len(batch))
            self._last_pass = loop.time() - began

    async def _wait_for_company(self) -> None:
        """Before a batch: wait, for at most `max_wait`, for what `wait` says, unless the batch is full already."""
        if self.wait == "fixed":
            if len(self._pending) < self.max_batch_size and not self._closing:
                await asyncio.sleep(self.max_wait)
            return
        if self._company_enough():
            return
        self._wakeup.clear()
        self._gathering = True
        try:
            async with asyncio.timeout(self.max_wait):
                await self._wakeup.wait()  # set by `_arrived` once there is company enough
        except TimeoutError:
            pass
        finally:
            self._gathering = False

    def _company_enough(self) -> bool:
        """With wait "coming": a full batch, or nothing more on its way and, after a pass that took `max_wait` or
        longer, as many inputs waiting as the larger of the last two batches held: waiting at most `max_wait` for
        them is little next to the pass it saves. The larger of two, so that a group cut in two once comes together
        again rather than taking turns for ever. After a shorter pass, a second pass costs less than the wait (a
        model answering at once served 0.86x the requests/s when each batch waited for the last one's size)."""
        waiting = len(self._pending)
        if waiting >= self.max_batch_size or self._closing:
            return True
        return not self._coming and (waiting >= max(self._sizes) or self._last_pass < self.max_wait)

    def _arrived(self) -> None:
        """After a submit, or a request no longer on its way: wake the worker if it is idle, or if it is gathering
        and has company enough now (one wake-up a batch, not one an input)."""
        if not self._gathering or self._company_enough():
            self._wakeup.set()

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> list:
        tags = ([i.tag for i in batch],) if self.tagged else ()
        rows = await loop.run_in_executor(self._executor, self.run_batch, [i.features for i in batch], *tags)
        if len(rows) != len(batch):
            raise RuntimeError(f"the model answered {len(rows)} rows for {len(batch)} inputs")
        return rows

    @staticmethod
    def _fail(item: Item, error: Exception) -> None:
        log.error("inference failed on an input (%s: %s)", type(error).__name__, str(error)[:300],
                  exc_info=(type(error), error, error.__traceback__))
        if not item.future.done():
            item.future.set_exception(error)

    async def _one_by_one(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> None:
        """After a batch failed: run each of its inputs alone, so only the inputs that make the model fail (and so
        only their requests) get the error. Inputs of different requests share batches; one client's input must
        not fail the others'."""
        if len(batch) > 1:
            log.warning("inference failed on a batch of %d inputs; running them one at a time", len(batch))
        for item in batch:
            if item.future.done():
                continue
            try:
                (row,) = await self._run(loop, [item])
            except Exception as e:
                self._fail(item, e)
                continue
            if self.on_batch is not None:
                self.on_batch(1)
            if not item.future.done():
                item.future.set_result(row)



class TaggedSubmitter:
    """One model's way into a batcher it shares with others (`Batcher.for_tag`): its inputs carry its tag."""

    def __init__(self, batcher: Batcher, tag: Any):
        self.batcher, self.tag = batcher, tag

    @property
    def depth(self) -> int:
        """Inputs waiting for a batch, every model's."""
        return self.batcher.depth

    def coming(self) -> contextlib.AbstractContextManager[None]:
        """`Batcher.coming`."""
        return self.batcher.coming()

    def submit(self, items: list[dict]) -> list[asyncio.Future]:
        """`Batcher.submit` with this model's tag."""
        return self.batcher.submit(items, self.tag)


# A tokenizer call holds at most this much text (about 30 ms of tokenising), so a short request that arrives while
# one runs waits that long at most before its own; and at most this many inputs.
ENCODE_BATCH_CHARS = 32_000
ENCODE_BATCH_INPUTS = 256


@dataclass
class _EncodeJob:
    inputs: list
    chars: int
    future: asyncio.Future = field(repr=False)


def split_encoded(encoded: Encoded, sizes: Sequence[int]) -> list[Encoded]:
    """The `Encoded` of consecutive requests' inputs (`sizes` inputs each) cut back into one per request: its
    features (a QA context's windows, a question's choices) and their owners counted from its own first input."""
    if {f.name for f in dataclasses.fields(encoded)} != {"features", "owner", "meta", "truncated"} \
            or type(encoded) is not Encoded:
        raise TypeError(f"cannot split a {type(encoded).__name__}: it holds more than features, owners, meta and "
                        f"truncation flags")
    ends = list(itertools.accumulate(sizes))
    starts = [0, *ends[:-1]]
    parts = [Encoded([], [], [], list(encoded.truncated[a:b])) for a, b in zip(starts, ends)]
    for feature, owner, meta in zip(encoded.features, encoded.owner, encoded.meta):
        r = bisect.bisect_right(ends, owner)
        parts[r].features.append(feature)
        parts[r].owner.append(owner - starts[r])
        parts[r].meta.append(meta)
    return parts


class EncodeBatcher:
    """Tokenise concurrent requests together, off the event loop: one `encode(inputs)` call (a fast tokenizer
    batch-encodes in Rust, without holding the GIL) on a thread of its own for all the requests that arrived while
    the previous call ran.

    Nothing waits for company: a request that finds the thread idle is tokenised at once, and those that come
    meanwhile are tokenised together next (at most ENCODE_BATCH_CHARS characters and ENCODE_BATCH_INPUTS inputs a
    call). Each request gets its own part of the result (`split_encoded`), and the tasks' `encode` treats every input
    alone (it pads nothing), so what an input is encoded to never depends on what it was tokenised with. When the
    call raises (one request's input is invalid, or makes the tokenizer choke), each of its requests is tokenised
    alone, so that only the request at fault gets the error (an `InputError` then names its own input).

    `encode` must be the thread's own (`Predictor.encode_inputs` of a predictor with its own tokenizer: a fast
    tokenizer must not be used by two threads at once). `on_done(chars)` is called on the event loop once a request's
    characters are tokenised or dropped (its request went away before its turn).
    """

    def __init__(self, encode: Callable[[list], Encoded], *, on_done: Callable[[int], None] | None = None,
                 max_chars: int = ENCODE_BATCH_CHARS, max_inputs: int = ENCODE_BATCH_INPUTS,
                 thread_name: str = "tokenise"):
        self.encode, self.on_done = encode, on_done
        self.max_chars, self.max_inputs = max_chars, max_inputs
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        """The thread; other work for it (post-processing) may be submitted too, and waits its turn."""
        self._waiting: collections.deque[_EncodeJob] = collections.deque()
        self._busy = False

    def submit(self, inputs: list, chars: int = 0) -> asyncio.Future:
        """A future of the inputs' `Encoded` (or the error encoding them raised); cancelling it drops the request if
        its turn has not come."""
        loop = asyncio.get_running_loop()
        job = _EncodeJob(inputs, chars, loop.create_future())
        self._waiting.append(job)
        if not self._busy:
            self._next(loop)
        return job.future

    def close(self) -> None:
        """Stop the thread once the work given to it is done."""
        self.executor.shutdown(wait=True)

    def _next(self, loop: asyncio.AbstractEventLoop) -> None:
        jobs: list[_EncodeJob] = []
        chars = count = 0
        while self._waiting:
            job = self._waiting[0]
            if job.future.done():  # its request went away before its turn
                self._finished(self._waiting.popleft())
                continue
            if jobs and (chars + job.chars > self.max_chars or count + len(job.inputs) > self.max_inputs):
                break
            jobs.append(self._waiting.popleft())
            chars, count = chars + job.chars, count + len(job.inputs)
        self._busy = bool(jobs)
        if not jobs:
            return
        try:
            done = self.executor.submit(self._encode_all, [job.inputs for job in jobs])
        except RuntimeError as e:  # the thread has been shut down (the server is stopping)
            self._deliver(loop, jobs, e)
            return
        done.add_done_callback(lambda f: loop.call_soon_threadsafe(self._deliver, loop, jobs, f))

    def _encode_all(self, batch: list[list]) -> list[Any]:
        """In the thread: each request's `Encoded`, or the exception encoding it raised."""
        if len(batch) > 1:
            try:
                return split_encoded(self.encode([item for inputs in batch for item in inputs]),
                                     [len(inputs) for inputs in batch])
            except Exception:  # one request at fault: each alone below, so only that one gets the error
                pass
        results: list[Any] = []
        for inputs in batch:
            try:
                results.append(self.encode(inputs))
            except Exception as e:
                results.append(e)
        return results

    def _deliver(self, loop: asyncio.AbstractEventLoop, jobs: list[_EncodeJob], done: Future | Exception) -> None:
        """On the event loop: answer each request its part, then start the next call with whoever has come."""
        if isinstance(done, Exception):
            results: list[Any] = [done] * len(jobs)
        elif done.exception() is not None:  # not an encoding error (those are per request): a bug, fail them all
            results = [done.exception()] * len(jobs)
        else:
            results = done.result()
        for job, result in zip(jobs, results):
            if not job.future.done():
                if isinstance(result, BaseException):
                    job.future.set_exception(result)
                else:
                    job.future.set_result(result)
            self._finished(job)
        self._next(loop)

    def _finished(self, job: _EncodeJob) -> None:
        if self.on_done is not None:
            self.on_done(job.chars)
