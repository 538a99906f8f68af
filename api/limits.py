"""Fairness between API keys: a request rate per key (token bucket) and decode slots shared with a reserve.

Every key (anonymous callers share one, "anonymous") gets a bucket of `rate_limit_burst` prediction
requests (/v1/predict, /v1/predict/batch, /v2 infer: the routes that decode and score), refilled at
`rate_limit_per_s`; an empty bucket is a 429 whose Retry-After says when the next token comes. Cheap
routes (models, feedback, health, metrics) are not charged, so monitoring still answers a flooded server.

Decodes run in `decode_concurrency` slots. One hostile file can hold a slot for seconds, so one key must
not be able to hold them all: a key runs at most `decodes_per_key` decodes at once, and a key that is
already decoding may take another slot only while more than `decode_reserve` slots stay free, so a
station with nothing decoding finds a slot at once. A key's further decodes wait their turn (first come,
first served), up to `decode_queue_per_key` of them; beyond that the request is a 429.

Everything here runs on the event loop (no locks): state changes and hand-overs are synchronous.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from starlette.concurrency import run_in_threadpool

from verity.api.errors import ApiError
from verity.api.metrics import Metrics
from verity.api.settings import Settings

log = logging.getLogger("verity.api")


def refill(tokens: float, counted: float, now: float, rate: float, burst: int) -> float:
    """The tokens a bucket holds at `now`: what it held at `counted`, refilled at `rate`, at most `burst`."""
    return min(float(burst), tokens + max(0.0, now - counted) * rate)


def charge(tokens: float, rate: float) -> tuple[float, float]:
    """(tokens left, seconds to wait): one token taken when there is one, else none and the wait."""
    if tokens >= 1.0:
        return tokens - 1.0, 0.0
    return tokens, (1.0 - tokens) / rate


class RequestRate:
    """Requests per second per key, as token buckets: `burst` at once, then `rate` a second. The buckets
    of one process; `SharedRequestRate` keeps them in the audit store for every worker."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)

    def take(self, key: str) -> float:
        """Takes one token: 0.0 when there was one, else the seconds until there is (nothing taken)."""
        if self.rate <= 0:
            return 0.0  # rate limiting is off
        now = self.clock()
        tokens, counted = self._buckets.get(key, (float(self.burst), now))
        tokens, wait = charge(refill(tokens, counted, now, self.rate, self.burst), self.rate)
        self._buckets[key] = (tokens, now)
        return wait


class SharedRequestRate:
    """The same buckets kept in the audit store that every worker opens (`AuditStore.take_token`), so a
    key's rate holds across `verity serve --workers N` (and across boxes on one PostgreSQL store). Each
    charge is one short transaction, off the event loop; the clock is the wall clock, which every worker
    (and every box kept in time) shares."""

    def __init__(self, store: RateStore, rate: float, burst: int) -> None:
        self.store, self.rate, self.burst = store, rate, burst
        self.local = RequestRate(rate, burst)

    async def take(self, key: str) -> float:
        if self.rate <= 0:
            return 0.0
        try:
            return await run_in_threadpool(self.store.take_token, key, self.rate, self.burst, time.time())
        except RuntimeError:  # the store's AuditError: keep limiting, per worker, until it answers again
            log.warning("shared request rate unavailable; limiting per worker", exc_info=True)
            return self.local.take(key)


class RateStore(Protocol):
    def take_token(self, key: str, rate: float, burst: int, now: float) -> float: ...


@dataclass
class _Waiter:
    key: str
    granted: asyncio.Future[None]


class DecodeSlots:
    """The decode slots of one event loop, shared fairly between keys (see the module docstring)."""

    def __init__(self, total: int, per_key: int, reserve: int, queue_per_key: int) -> None:
        self.total = total
        self.per_key = max(1, min(per_key, total))
        self.reserve = reserve
        self.queue_per_key = queue_per_key
        self._running: Counter[str] = Counter()
        self._waiting: Counter[str] = Counter()
        self._queue: deque[_Waiter] = deque()
        self._busy = 0

    def running(self, key: str) -> int:
        return self._running[key]

    def _may_start(self, key: str) -> bool:
        held = self._running[key]
        if self._busy >= self.total or held >= self.per_key:
            return False
        # The last `reserve` free slots go only to keys with nothing decoding.
        return held == 0 or self.total - self._busy - 1 >= self.reserve

    def _start(self, key: str) -> None:
        self._running[key] += 1
        self._busy += 1

    def _release(self, key: str) -> None:
        self._running[key] -= 1
        self._busy -= 1
        if not self._running[key]:
            del self._running[key]
        self._hand_over()

    def _hand_over(self) -> None:
        """Gives freed slots to the waiters that may now start, oldest first. After every change no
        waiter could start, so a newcomer that can start takes nothing a waiter could have had."""
        for waiter in list(self._queue):
            if not waiter.granted.done() and self._may_start(waiter.key):
                self._start(waiter.key)
                waiter.granted.set_result(None)

    def full_for(self, key: str) -> bool:
        """Whether `key` already has every decode it may run or queue."""
        return self._running[key] + self._waiting[key] >= self.per_key + self.queue_per_key

    async def _acquire(self, key: str) -> None:
        if self._may_start(key):
            self._start(key)
            return
        waiter = _Waiter(key, asyncio.get_running_loop().create_future())
        self._queue.append(waiter)
        self._waiting[key] += 1
        try:
            await waiter.granted
        except asyncio.CancelledError:
            if waiter.granted.done() and not waiter.granted.cancelled():
                self._release(key)  # granted in the same moment the request was cancelled
            raise
        finally:
            self._queue.remove(waiter)
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]

    @contextlib.asynccontextmanager
    async def slot(self, key: str) -> AsyncIterator[None]:
        """Holds one decode slot for `key`, waiting for it in turn (KeyLimits checks `full_for` first)."""
        await self._acquire(key)
        try:
            yield
        finally:
            self._release(key)


class KeyLimits:
    """The app's limits per key: `admit` charges a request, `decode_slot` holds a decode slot. A refusal
    is a 429 with Retry-After, counted in verity_rate_limited_total by reason and key."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.metrics = metrics
        self.retry_after_s = settings.retry_after_s
        self.requests = RequestRate(settings.rate_limit_per_s, settings.rate_limit_burst)
        # The rate kept in the store every worker shares (`share`, when settings.shared_limits is on).
        self.shared: SharedRequestRate | None = None
        self.decodes = DecodeSlots(
            settings.decode_concurrency,
            settings.decodes_per_key or settings.decode_concurrency - settings.decode_reserve,
            settings.decode_reserve,
            settings.decode_queue_per_key,
        )

    def _refuse(self, reason: str, key: str, message: str, retry_after_s: float) -> ApiError:
        self.metrics.rate_limited.labels(reason, key).inc()
        return ApiError(429, "rate_limited", message, {"Retry-After": str(max(1, math.ceil(retry_after_s)))})

    def share(self, store: RateStore) -> None:
        """Keeps the request rates in `store`, which every worker opens, from now on."""
        self.shared = SharedRequestRate(store, self.requests.rate, self.requests.burst)

    async def admit(self, key: str) -> None:
        """Charges one request to `key`'s bucket, or raises the 429."""
        wait = await self.shared.take(key) if self.shared is not None else self.requests.take(key)
        if wait > 0:
            raise self._refuse(
                "requests",
                key,
                f"Too many requests from this key: at most {self.requests.burst} at once and "
                f"{self.requests.rate:g} a second. Retry after the seconds in Retry-After.",
                wait,
            )

    def decode_slot(self, key: str) -> contextlib.AbstractAsyncContextManager[None]:
        """A decode slot for `key` (entering it may wait its turn), or the 429 when the key already has
        every decode it may run or queue."""
        if self.decodes.full_for(key):
            limit = self.decodes.per_key + self.decodes.queue_per_key
            raise self._refuse(
                "decodes",
                key,
                f"This key already has {limit} images decoding or waiting to decode, its limit. "
                "Retry when some have been answered.",
                self.retry_after_s,
            )
        return self.decodes.slot(key)
