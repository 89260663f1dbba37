"""Dynamic batching behind a bounded queue, on the server's event loop.

A request becomes a ``Job`` (its encoded texts) and waits in a queue of at most ``max_queue`` jobs; beyond that
``submit`` raises ``QueueFull`` at once (the endpoint answers 429 with Retry-After), so no request waits without
bound. One dispatcher task takes the oldest job, waits up to ``max_wait`` (from that job's arrival, as Triton's
``max_queue_delay``) for others until the batch holds ``max_batch`` texts, and runs the batch in one worker
thread, so that the event loop keeps accepting, refusing and answering requests while the model computes. While
a batch computes the next one gathers, so a busy server batches without waiting at all.

Written here rather than taken from a library: the batching of Triton, Ray Serve or TorchServe comes with their
whole server; what is needed is this one loop, on the runtime interface ``verify`` and ``bench`` use.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field


class QueueFull(Exception):
    def __init__(self, retry_after_s: int):
        super().__init__(f"queue full, retry after {retry_after_s} s")
        self.retry_after_s = retry_after_s


@dataclass
class Job:
    items: list  # what run_batch takes, one per text
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    cancelled: bool = False  # the request timed out or its client left: skipped when its turn comes
    on_event: object = None  # streaming jobs: called from the worker thread with each piece


class Batcher:
    """``compute(items) -> answers`` (one per item) runs in a single worker thread, one batch at a time."""

    def __init__(self, compute, max_batch: int, max_wait_s: float, max_queue: int, observe=None):
        self.compute, self.max_batch, self.max_wait_s, self.max_queue = compute, max_batch, max_wait_s, max_queue
        self.observe = observe  # observe(kind, value): the metrics hook ("batch_size", "queue_wait", "compute")
        self.queue: collections.deque[Job] = collections.deque()
        self._wake = asyncio.Event()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="edgekit-batch")
        self._task: asyncio.Task | None = None
        self._recent_batch_s = 0.01  # moving average of a batch's compute time, for Retry-After
        self.in_flight = 0

    # ---- requests ----------------------------------------------------------------------------------------

    def submit(self, items: list, on_event=None) -> Job:
        if len(self.queue) >= self.max_queue:
            raise QueueFull(self.retry_after())
        job = Job(items, asyncio.get_running_loop().create_future(), on_event=on_event)
        self.queue.append(job)
        self._wake.set()
        self._observe("queue_depth", len(self.queue))
        return job

    def retry_after(self) -> int:
        """Seconds until the queue has room again, at the recent pace of batches (at least 1: the header's unit)."""
        batches_ahead = math.ceil(max(len(self.queue), 1) / max(self.max_batch, 1))
        return max(1, math.ceil(batches_ahead * self._recent_batch_s))

    # ---- the dispatcher -----------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued (graceful shutdown: in-flight requests are answered), then stop."""
        while self.queue or self.in_flight:
            await asyncio.sleep(0.005)
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._pool.shutdown(wait=True)

    def _observe(self, kind: str, value: float) -> None:
        if self.observe is not None:
            self.observe(kind, value)

    def _drop_cancelled(self) -> None:
        while self.queue and self.queue[0].cancelled:
            self.queue.popleft()

    async def _gather(self) -> list[Job]:
        """The next batch: the oldest job and those that join it within max_wait, up to max_batch texts."""
        while True:
            self._drop_cancelled()
            if self.queue:
                break
            self._wake.clear()
            await self._wake.wait()
        deadline = self.queue[0].enqueued + self.max_wait_s
        while sum(len(j.items) for j in self.queue if not j.cancelled) < self.max_batch:
            left = deadline - time.perf_counter()
            if left <= 0:
                break
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), left)
            except asyncio.TimeoutError:
                break
        batch, n = [], 0
        while self.queue:
            job = self.queue[0]
            if job.cancelled:
                self.queue.popleft()
                continue
            if batch and n + len(job.items) > self.max_batch:
                break
            batch.append(self.queue.popleft())
            n += len(job.items)
        self._observe("queue_depth", len(self.queue))
        return batch

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if not batch:
                continue
            now = time.perf_counter()
            for job in batch:
                self._observe("queue_wait", now - job.enqueued)
            items = [it for job in batch for it in job.items]
            self._observe("batch_size", len(items))
            self.in_flight += 1
            t0 = time.perf_counter()
            try:
                answers = await loop.run_in_executor(self._pool, self._compute, batch, items)
            except Exception as e:  # the model failed on this batch: every job in it gets the error
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            finally:
                self.in_flight -= 1
                elapsed = time.perf_counter() - t0
                self._recent_batch_s = 0.8 * self._recent_batch_s + 0.2 * elapsed
            self._observe("compute", elapsed)
            k = 0
            for job in batch:
                mine, k = answers[k:k + len(job.items)], k + len(job.items)
                if not job.future.done():
                    job.future.set_result(mine)

    def _compute(self, batch: list[Job], items: list) -> list:
        if len(batch) == 1 and batch[0].on_event is not None:  # a streaming job (completions) runs on its own
            return self.compute(items, batch[0])
        out = []
        for start in range(0, len(items), self.max_batch):  # a request larger than max_batch runs in slices
            out.extend(self.compute(items[start:start + self.max_batch], None))
        return out
