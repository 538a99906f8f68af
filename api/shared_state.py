"""State that every worker shares: a change made through one worker reaches all of them.

`verity serve --workers N` runs N processes, each with its own models in memory. Key revocations and
reference enrolments already reach every worker, because each re-reads the key file and the reference
events file when they change. A model reload is different: the worker that got `POST /v1/models/reload`
rescans the models folder, and the others must learn that they should too. The audit store, which every
worker shares already (SQLite beside them, or PostgreSQL for many boxes), keeps a counter per kind of
change (`AuditStore.bump_generation`); every worker polls it every POLL_S seconds and reloads when the
count moves. No new server is needed for it, and a worker that restarts reads the count once and starts
from the files as they are.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError, AuditStore
from verity.api.registry import ModelRegistry

MODELS = "models"  # the counter of model reloads and promotions
POLL_S = 0.5  # well inside the 2 s within which every worker must follow

log = logging.getLogger("verity.api")


class ReloadFollower:
    """Reloads this worker's models whenever another worker counted a reload."""

    def __init__(self, store: AuditStore, registry: ModelRegistry) -> None:
        self.store, self.registry = store, registry
        self.seen = 0

    async def start(self) -> None:
        self.seen = await run_in_threadpool(self.store.generation, MODELS)

    async def announce(self) -> None:
        """After this worker reloaded: count it, and take the new count as seen (no second reload)."""
        self.seen = await run_in_threadpool(self.store.bump_generation, MODELS)

    async def check(self) -> None:
        count = await run_in_threadpool(self.store.generation, MODELS)
        if count != self.seen:
            self.seen = count
            report = await self.registry.reload()
            details = {"generation": count, "loaded": report.loaded, "defaults": report.defaults}
            log.info("models reloaded after another worker's reload", extra=details)

    async def run(self) -> None:
        """Polls until cancelled; a store that cannot be read is logged and tried again."""
        while True:
            await asyncio.sleep(POLL_S)
            try:
                await self.check()
            except AuditError:
                log.warning("could not read the shared reload count; retrying", exc_info=True)

    @contextlib.asynccontextmanager
    async def following(self) -> AsyncIterator[ReloadFollower]:
        """Polls while the app runs (the lifespan holds it)."""
        await self.start()
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
