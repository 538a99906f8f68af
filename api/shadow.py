"""Shadow scoring: a candidate model (VERITY_SHADOW=name/version or name@alias) answers live traffic
beside the one serving, and its answers go to the audit log only (`shadow_scores`), never to the client.

It must not slow an answer: an image is offered to the shadow after the production verdict is recorded,
into a bounded queue that one background task drains; when the queue is full (the box is busy) the image
is dropped and counted (`verity_shadow_total{outcome="dropped"}`), never waited for. The shadow scores
through the one pipeline with its own engine, not the serving batcher. `verity shadow report` reads the
pairs back: agreement, and the cases where the two disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

from prometheus_client import CollectorRegistry, Counter
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError, AuditStore, ShadowRecord
from verity.api.registry import ModelRegistry
from verity.inference.decode_limits import DecodeError
from verity.inference.pipeline import score_bytes
from verity.inference.stamps import utc_now
from verity.inference.vocabulary import NonFiniteScore

log = logging.getLogger("verity.api.shadow")

QUEUE_SIZE = 64


def shadow_outcomes(registry: CollectorRegistry) -> Counter:
    """The shadow's counter, registered once per app (api.metrics) so that a lifespan restarted is fine."""
    return Counter(
        "verity_shadow_total",
        "Images offered to the shadow model (VERITY_SHADOW), by outcome: scored, dropped (the shadow was "
        "behind), skipped (another modality, or unreadable to it).",
        ["outcome"],
        registry=registry,
    )


class ShadowScorer:
    def __init__(self, reference: str, registry: ModelRegistry, audit: AuditStore, outcomes: Counter,
                 queue_size: int = QUEUE_SIZE) -> None:  # fmt: skip
        self.reference, self.registry, self.audit = reference, registry, audit
        self.queue: asyncio.Queue[tuple[str, str, bytes]] = asyncio.Queue(maxsize=queue_size)
        self.outcomes = outcomes  # api.metrics: verity_shadow_total{outcome}
        # One thread of its own, at a lower CPU priority than the threads that answer (Linux schedules
        # threads one by one): on a busy box the shadow waits, the answers do not.
        self._executor = ThreadPoolExecutor(1, "verity-shadow", initializer=_lower_priority)

    def offer(self, request_id: str, modality: str, data: bytes) -> None:
        """Queues an answered image for the shadow, or drops it when the shadow is behind."""
        try:
            self.queue.put_nowait((request_id, modality, data))
        except asyncio.QueueFull:
            self.outcomes.labels("dropped").inc()

    def _score(self, request_id: str, modality: str, data: bytes) -> ShadowRecord | None:
        served = self.registry.resolve(self.reference)
        if served is None or served.modality != modality:
            return None
        try:
            scored = score_bytes(data, served.engine, with_cam=False)
        except (DecodeError, NonFiniteScore, ValueError):
            return None
        return ShadowRecord(request_id, utc_now(), served.engine.name, served.engine.version, scored.score,
                            scored.verdict, scored.recognised)  # fmt: skip

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            request_id, modality, data = await self.queue.get()
            try:
                record = await loop.run_in_executor(self._executor, self._score, request_id, modality, data)
                if record is None:
                    self.outcomes.labels("skipped").inc()
                    continue
                await run_in_threadpool(self.audit.record_shadow, record)
                self.outcomes.labels("scored").inc()
            except AuditError:
                log.warning("shadow answer not recorded", exc_info=True)
                self.outcomes.labels("dropped").inc()
            finally:
                self.queue.task_done()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[ShadowScorer]:
        """The background task for the app's lifetime; what is queued at shutdown is dropped."""
        task = asyncio.create_task(self._drain())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self._executor.shutdown(wait=False, cancel_futures=True)


NICENESS = 10


def _lower_priority() -> None:
    """The shadow thread's nice value, raised (where the system lets it: nothing changes elsewhere)."""
    with contextlib.suppress(OSError, AttributeError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICENESS)
