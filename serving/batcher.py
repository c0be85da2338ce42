"""Dynamic batching: inputs of concurrent requests share forward passes.

Requests put their inputs on a bounded queue and await one future per input. A single worker task
takes the first waiting input, gathers more for at most `max_wait` seconds or until the batch is full
(by count, or by padded tokens: longest input x batch size), and runs the model in a worker thread,
so the event loop never blocks on inference. Written here because no maintained library does
request coalescing for an in-process PyTorch model inside FastAPI without a separate server.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """More inputs are waiting than the queue may hold; the caller should retry later."""


@dataclass
class Item:
    features: dict  # the encoded input (input_ids, attention_mask, ...), truncated to the model's length
    future: asyncio.Future = field(repr=False)

    @property
    def length(self) -> int:
        ids = self.features["input_ids"]
        # A multiple-choice feature holds its choices' token lists; the batch pads to the longest.
        return max(len(x) for x in ids) if ids and isinstance(ids[0], list) else len(ids)


class Batcher:
    """Coalesce single inputs into batches and run them off the event loop."""

    def __init__(self, run_batch: Callable[[list[dict]], np.ndarray], *, max_batch_size: int = 32,
                 max_batch_tokens: int = 8192, max_wait: float = 0.005, max_queue: int = 512,
                 on_batch: Callable[[int], None] | None = None):
        self.run_batch = run_batch
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

    def submit(self, items: list[dict]) -> list[asyncio.Future]:
        """Queue encoded inputs; all or none, never past max_queue."""
        if self._closing:
            raise QueueFull("the server is shutting down")
        if len(self._pending) + len(items) > self.max_queue:
            raise QueueFull(f"{len(self._pending)} inputs are already waiting (limit {self.max_queue})")
        loop = asyncio.get_running_loop()
        futures = []
        for features in items:
            item = Item(features, loop.create_future())
            self._pending.append(item)
            futures.append(item.future)
        self._wakeup.set()
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
            # Wait briefly for company unless a full batch is already waiting.
            if len(self._pending) < self.max_batch_size and not self._closing:
                await asyncio.sleep(self.max_wait)
            batch = self._take_batch()
            if not batch:
                continue
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

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[Item]) -> list:
        rows = await loop.run_in_executor(self._executor, self.run_batch, [i.features for i in batch])
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
