"""MicroBatcher: gathers concurrent single-image requests into one model batch (asyncio).

The rule is Triton's dynamic batcher (and Ray Serve's `@serve.batch`): a batch is sent as soon as it
holds `max_batch_size` requests, or when the OLDEST queued request has waited `max_delay_ms`, whichever
comes first. The batch runs in a thread executor so the event loop keeps accepting and decoding
requests meanwhile; when a batch takes longer than the delay, the requests that arrived during it are
already past their deadline and go out at once as the next batch.

Every waiter gets its own result, or the batch's exception. The queue is bounded: when it is full,
`submit` raises `QueueFullError` at once (the API answers 503 with Retry-After) instead of letting
latency grow without limit. `max_batch_size=1` turns batching off (each request runs alone, in order).

Metrics: no Prometheus here (inference/ stays dependency-light). `on_batch` receives a `BatchStats`
for every batch, and `stats` keeps running counters, for the API to export as it likes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("verity.batcher")


class QueueFullError(RuntimeError):
    """The batcher's queue is full: the server is at capacity and the caller should retry later."""


class BatcherClosedError(RuntimeError):
    """The batcher is stopped or stopping and takes no new requests."""


@dataclass(frozen=True)
class BatchStats:
    """One batch: how many requests, how long they queued (oldest and mean), how long the model ran."""

    size: int
    queue_ms_max: float
    queue_ms_mean: float
    compute_ms: float
    failed: bool


@dataclass
class BatcherCounters:
    """Running totals since start; `batch_sizes` maps batch size to how many batches had it."""

    batches: int = 0
    items: int = 0
    failed_batches: int = 0
    rejected: int = 0
    cancelled: int = 0
    compute_s: float = 0.0
    queue_s: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)

    @property
    def mean_batch_size(self) -> float:
        return self.items / self.batches if self.batches else 0.0


@dataclass
class _Request:
    payload: Any
    future: asyncio.Future[Any]
    enqueued: float  # time.perf_counter() at submit


def stack_inputs(inputs: Sequence[Any]) -> Any:
    """Default collation: equal-shaped arrays become one NxCxSxS float32 batch; anything else a list."""
    if inputs and all(isinstance(x, np.ndarray) for x in inputs) and len({x.shape for x in inputs}) == 1:
        return np.stack(inputs).astype(np.float32, copy=False)
    return list(inputs)


class MicroBatcher:
    """Dynamic batching in front of one model. Use one batcher per engine.

    `run_batch(batch)` gets the collated batch (by default an NxCxSxS array) and must return one result
    per input, in order. It runs in `executor` (by default a private single-thread pool, so model runs
    do not compete with the decode threads of the web server's own pool).
    """

    def __init__(
        self,
        run_batch: Callable[[Any], Sequence[Any]],
        max_batch_size: int = 8,
        max_delay_ms: float = 5.0,
        max_queue: int = 256,
        executor: Executor | None = None,
        *,
        collate: Callable[[Sequence[Any]], Any] = stack_inputs,
        on_batch: Callable[[BatchStats], None] | None = None,
        workers: int = 1,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(
                f"max_batch_size must be at least 1 (1 turns batching off), got {max_batch_size}."
            )
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be zero or more, got {max_delay_ms}.")
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}.")
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}.")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.max_queue = max_queue
        self.collate = collate
        self.on_batch = on_batch
        self.workers = workers
        self.stats = BatcherCounters()
        self._executor = executor
        self._owns_executor = executor is None
        self._queue: deque[_Request] = deque()
        self._wakeup: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._accepting = False
        self._draining = False

    @property
    def batching(self) -> bool:
        return self.max_batch_size > 1

    @property
    def running(self) -> bool:
        return self._accepting

    def queue_depth(self) -> int:
        """Requests waiting for a batch (not counting the batch being computed)."""
        return len(self._queue)

    async def start(self) -> None:
        """Starts the worker task(s) on the running event loop."""
        if self._tasks:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="verity-batch")
            self._owns_executor = True
        self._wakeup = asyncio.Event()
        self._accepting = True
        self._draining = False
        self._tasks = [
            asyncio.create_task(self._worker(), name=f"verity-batcher-{i}") for i in range(self.workers)
        ]

    async def stop(self, drain: bool = True) -> None:
        """Refuses new requests; with `drain` runs everything queued first, otherwise fails it.

        The batch being computed always completes (a thread cannot be interrupted) and its waiters get
        their results.
        """
        self._accepting = False
        if not drain:
            while self._queue:
                request = self._queue.popleft()
                if not request.future.done():
                    closed = BatcherClosedError("The server is shutting down; retry later.")
                    request.future.set_exception(closed)
        self._draining = True
        if self._wakeup is not None:
            self._wakeup.set()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._owns_executor and self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    async def submit(self, payload: Any) -> Any:
        """Queues one input and waits for its own result (or the exception its batch raised)."""
        if not self._accepting or self._wakeup is None:
            raise BatcherClosedError("The batcher is not running: call start() first, or it is stopping.")
        if len(self._queue) >= self.max_queue:
            self.stats.rejected += 1
            raise QueueFullError(
                f"The batching queue is full ({self.max_queue} requests waiting); retry shortly."
            )
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append(_Request(payload, future, time.perf_counter()))
        self._wakeup.set()
        return await future

    async def __aenter__(self) -> MicroBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop(drain=True)

    # -- worker -------------------------------------------------------------------------------------

    def _pop_live(self, batch: list[_Request]) -> None:
        """Moves queued requests into `batch` up to the size limit, skipping callers that gave up."""
        while self._queue and len(batch) < self.max_batch_size:
            request = self._queue.popleft()
            if request.future.done():  # the caller was cancelled (e.g. the client disconnected)
                self.stats.cancelled += 1
                continue
            batch.append(request)

    async def _wait_for_work(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        self._wakeup.clear()
        if timeout is None:
            await self._wakeup.wait()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout)

    async def _gather(self) -> list[_Request] | None:
        """The next batch per the Triton rule, or None when stopping with an empty queue."""
        batch: list[_Request] = []
        while not batch:
            self._pop_live(batch)
            if batch:
                break
            if self._draining:
                return None
            await self._wait_for_work(None)
        deadline = batch[0].enqueued + self.max_delay_s
        while len(batch) < self.max_batch_size and not self._draining:
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            await self._wait_for_work(remaining)
            self._pop_live(batch)
        self._pop_live(batch)  # anything that arrived meanwhile, still within the size limit
        return batch

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._gather()
            if batch is None:
                return
            await self._run(loop, batch)

    async def _run(self, loop: asyncio.AbstractEventLoop, batch: list[_Request]) -> None:
        started = time.perf_counter()
        waits = [started - request.enqueued for request in batch]
        failed = False
        try:
            collated = self.collate([request.payload for request in batch])
            results = await loop.run_in_executor(self._executor, self.run_batch, collated)
            if len(results) != len(batch):
                raise RuntimeError(f"run_batch returned {len(results)} results for a batch of {len(batch)}.")
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)
        except Exception as error:  # every waiter of the batch gets the batch's exception
            failed = True
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
        compute_s = time.perf_counter() - started
        self._record(len(batch), waits, compute_s, failed)

    def _record(self, size: int, waits: list[float], compute_s: float, failed: bool) -> None:
        stats = self.stats
        stats.batches += 1
        stats.items += size
        stats.failed_batches += int(failed)
        stats.compute_s += compute_s
        stats.queue_s += sum(waits)
        stats.batch_sizes[size] = stats.batch_sizes.get(size, 0) + 1
        if self.on_batch is None:
            return
        batch_stats = BatchStats(
            size=size,
            queue_ms_max=max(waits) * 1000.0,
            queue_ms_mean=sum(waits) / size * 1000.0,
            compute_ms=compute_s * 1000.0,
            failed=failed,
        )
        try:
            self.on_batch(batch_stats)
        except Exception:  # a broken metrics hook must not stop the serving loop
            log.exception("on_batch callback failed")
