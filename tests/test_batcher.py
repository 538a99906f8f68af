"""MicroBatcher: gathering, the max-delay rule, per-waiter results, errors, overload and shutdown.

The tests check behaviour (which requests share a batch, in what order, who gets which result), not
wall-clock speed: the machine may be busy, so every time bound is at least 5 times what it measures,
the delay rule is checked on a clock the test moves, and a test waits for an event (the model was
entered, the queue holds N) rather than sleeping and hoping it happened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from verity.inference import batcher as batcher_module
from verity.inference.batcher import BatcherClosedError, BatchStats, MicroBatcher, QueueFullError

if TYPE_CHECKING:
    from verity.api.registry import ServedModel

PATIENCE_S = 5.0  # how long a test waits for something that takes milliseconds


class Recorder:
    """A fake model: returns each input's first value times 10 and remembers the batch sizes."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.release = threading.Event()
        self.release.set()
        self.entered = threading.Event()  # set once a batch is inside the model

    def __call__(self, batch: np.ndarray) -> list[float]:
        self.entered.set()
        self.release.wait(PATIENCE_S)
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        if self.fail:
            raise ValueError("model exploded")
        return [float(x.flat[0]) * 10 for x in batch]


def item(value: float) -> np.ndarray:
    return np.full((1, 2, 2), value, dtype=np.float32)


def run(coro):  # noqa: ANN001, ANN201 - test helper
    return asyncio.run(coro)


async def until(condition: Callable[[], bool]) -> None:
    """Yields to the loop until `condition` holds (what a sleep of a guessed length only hoped for)."""
    async with asyncio.timeout(PATIENCE_S):
        while not condition():
            await asyncio.sleep(0.001)


async def model_entered(model: Recorder) -> None:
    """Waits until a batch is inside the (blocked) model."""
    assert await asyncio.to_thread(model.entered.wait, PATIENCE_S)


class SkippingClock:
    """The batcher's clock (`time.perf_counter`), which a test can move forward at once: the real clock
    plus the seconds skipped, so waits still end."""

    def __init__(self) -> None:
        self.skipped = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.skipped

    def skip(self, seconds: float) -> None:
        self.skipped += seconds


def test_concurrent_submits_form_one_batch_with_their_own_results() -> None:
    model = Recorder()

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=8, max_delay_ms=200) as batcher:
            return await asyncio.gather(*(batcher.submit(item(i)) for i in range(8)))

    results = run(scenario())
    assert results == [i * 10.0 for i in range(8)]
    assert model.sizes == [8]  # full batch sent at once, without waiting for the 200 ms delay


def test_partial_batch_goes_out_after_max_delay() -> None:
    model = Recorder()

    async def scenario() -> tuple[list[float], float]:
        async with MicroBatcher(model, max_batch_size=8, max_delay_ms=50) as batcher:
            started = time.perf_counter()
            results = await asyncio.gather(*(batcher.submit(item(i)) for i in range(3)))
            return results, time.perf_counter() - started

    results, elapsed = run(scenario())
    assert results == [0.0, 10.0, 20.0]
    assert model.sizes == [3]  # one batch, sent although not full
    assert elapsed >= 0.045  # not before the delay (a lower bound: a busy machine only adds to it)


def test_delay_counts_from_the_oldest_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first request has waited 9.9 s of a 10 s delay when the second arrives: the batch goes out
    0.1 s later with both. Counted from the second, it would wait 10 s more and the test time out."""
    clock = SkippingClock()
    monkeypatch.setattr(batcher_module, "time", clock)
    model = Recorder()

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=8, max_delay_ms=10_000) as batcher:
            first = asyncio.create_task(batcher.submit(item(1)))
            await asyncio.sleep(0)  # the task runs up to its wait: it is queued, stamped before the skip
            clock.skip(9.9)
            second = asyncio.create_task(batcher.submit(item(2)))
            async with asyncio.timeout(PATIENCE_S):
                return list(await asyncio.gather(first, second))

    assert run(scenario()) == [10.0, 20.0]
    assert model.sizes == [2]


def test_batch_size_limit_splits_a_burst() -> None:
    model = Recorder()

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=4, max_delay_ms=20) as batcher:
            return await asyncio.gather(*(batcher.submit(item(i)) for i in range(10)))

    assert run(scenario()) == [i * 10.0 for i in range(10)]
    assert model.sizes == [4, 4, 2]


def test_batching_off_runs_each_request_alone() -> None:
    model = Recorder()

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=1, max_delay_ms=50) as batcher:
            assert not batcher.batching
            return await asyncio.gather(*(batcher.submit(item(i)) for i in range(5)))

    assert run(scenario()) == [i * 10.0 for i in range(5)]
    assert model.sizes == [1] * 5


def test_exception_reaches_every_waiter_and_the_batcher_keeps_serving() -> None:
    model = Recorder(fail=True)

    async def scenario() -> tuple[list[object], float]:
        async with MicroBatcher(model, max_batch_size=4, max_delay_ms=10) as batcher:
            submits = (batcher.submit(item(i)) for i in range(4))
            outcomes = await asyncio.gather(*submits, return_exceptions=True)
            model.fail = False
            after = await batcher.submit(item(7))
            assert batcher.stats.failed_batches == 1
            return outcomes, after

    outcomes, after = run(scenario())
    assert all(isinstance(o, ValueError) and "exploded" in str(o) for o in outcomes)
    assert after == 70.0


def test_wrong_number_of_results_is_an_error_for_all() -> None:
    async def scenario() -> list[object]:
        async with MicroBatcher(lambda batch: [1.0], max_batch_size=4, max_delay_ms=10) as batcher:
            return await asyncio.gather(*(batcher.submit(item(i)) for i in range(3)), return_exceptions=True)

    outcomes = run(scenario())
    assert all(isinstance(o, RuntimeError) and "1 results for a batch of 3" in str(o) for o in outcomes)


def test_full_queue_refuses_with_queue_full_error() -> None:
    model = Recorder()
    model.release.clear()  # the model blocks: the first batch holds, the queue fills up

    async def scenario() -> tuple[int, list[float]]:
        async with MicroBatcher(model, max_batch_size=2, max_delay_ms=0, max_queue=3) as batcher:
            first = [asyncio.create_task(batcher.submit(item(i))) for i in range(2)]
            await model_entered(model)  # the worker took them and blocks in the model
            queued = [asyncio.create_task(batcher.submit(item(i))) for i in range(2, 5)]
            await until(lambda: batcher.queue_depth() == 3)
            with pytest.raises(QueueFullError, match="queue is full"):
                await batcher.submit(item(99))
            model.release.set()
            results = await asyncio.gather(*first, *queued)
            return batcher.stats.rejected, results

    rejected, results = run(scenario())
    assert rejected == 1
    assert results == [0.0, 10.0, 20.0, 30.0, 40.0]


def test_stop_with_drain_finishes_queued_requests_and_then_refuses() -> None:
    model = Recorder(delay_s=0.02)

    async def scenario() -> list[float]:
        batcher = MicroBatcher(model, max_batch_size=2, max_delay_ms=60_000)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(item(i))) for i in range(5)]
        await asyncio.sleep(0)
        async with asyncio.timeout(PATIENCE_S):  # the partial batch must not wait its minute's delay
            await batcher.stop(drain=True)
        with pytest.raises(BatcherClosedError):
            await batcher.submit(item(1))
        return await asyncio.gather(*tasks)

    assert run(scenario()) == [i * 10.0 for i in range(5)]
    assert model.sizes == [2, 2, 1]


def test_stop_without_drain_fails_queued_requests() -> None:
    model = Recorder()
    model.release.clear()

    async def scenario() -> list[object]:
        batcher = MicroBatcher(model, max_batch_size=1, max_delay_ms=0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(item(i))) for i in range(3)]
        await model_entered(model)  # the first is in the model, two are queued
        await until(lambda: batcher.queue_depth() == 2)
        stopping = asyncio.create_task(batcher.stop(drain=False))
        await until(lambda: batcher.queue_depth() == 0)  # the queued ones were failed
        model.release.set()
        await stopping
        return await asyncio.gather(*tasks, return_exceptions=True)

    outcomes = run(scenario())
    assert outcomes[0] == 0.0  # the running batch completes
    assert all(isinstance(o, BatcherClosedError) for o in outcomes[1:])


def test_cancelled_waiter_is_skipped_and_metrics_hook_sees_each_batch() -> None:
    model = Recorder()
    seen: list[BatchStats] = []

    async def scenario() -> float:
        async with MicroBatcher(model, max_batch_size=4, max_delay_ms=30, on_batch=seen.append) as batcher:
            doomed = asyncio.create_task(batcher.submit(item(5)))
            kept = asyncio.create_task(batcher.submit(item(6)))
            await asyncio.sleep(0)
            doomed.cancel()
            return await kept

    assert run(scenario()) == 60.0
    assert model.sizes == [1]
    assert len(seen) == 1 and seen[0].size == 1 and not seen[0].failed
    assert seen[0].queue_ms_max >= 25 and seen[0].compute_ms >= 0


def test_submit_before_start_and_bad_settings_are_clear_errors() -> None:
    batcher = MicroBatcher(Recorder())
    with pytest.raises(BatcherClosedError, match="start"):
        run(batcher.submit(item(1)))
    with pytest.raises(ValueError, match="max_batch_size"):
        MicroBatcher(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_queue"):
        MicroBatcher(Recorder(), max_queue=0)


def test_two_workers_compute_two_batches_at_the_same_time() -> None:
    # Each batch waits at the barrier until another batch is in flight: one worker alone would break it.
    barrier = threading.Barrier(2, timeout=5)

    def model(batch: np.ndarray) -> list[float]:
        barrier.wait()
        return [float(x.flat[0]) for x in batch]

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=4, max_delay_ms=20, workers=2) as batcher:
            return await asyncio.gather(*(batcher.submit(item(i)) for i in range(8)))

    assert run(scenario()) == [float(i) for i in range(8)]


class ProviderOnlyEngine:
    """What ServedModel reads of an engine to size its batcher: the execution provider."""

    def __init__(self, provider: str) -> None:
        self.providers = [provider]


def served_model(folder: Path, provider: str, **settings: Any) -> ServedModel:
    """A ServedModel on `provider` with these settings (never started: only its batcher's sizing is read)."""
    from verity.api.registry import ServedModel
    from verity.api.settings import Settings

    return ServedModel(ProviderOnlyEngine(provider), folder / "model.onnx", Settings(**settings))  # type: ignore[arg-type]


def test_served_model_runs_one_batch_worker_per_core_on_cpu_and_one_on_gpu(tmp_path) -> None:  # noqa: ANN001
    from verity.inference.engine import usable_cores

    def workers(provider: str, **settings: object) -> int:
        return served_model(tmp_path, provider, **settings)._batch_workers()

    assert workers("CPUExecutionProvider") == usable_cores() >= 1
    assert workers("CUDAExecutionProvider") == 1
    assert workers("CPUExecutionProvider", batch_workers=3) == 3
    # `verity serve --workers N` shares the cores among its processes: never two model runs per core.
    assert workers("CPUExecutionProvider", worker_processes=2) == max(1, usable_cores() // 2)
    assert workers("CPUExecutionProvider", worker_processes=64) == 1
    assert workers("CUDAExecutionProvider", worker_processes=2) == 1


def test_without_a_wait_a_lone_request_runs_alone_and_those_queued_behind_a_batch_fill_the_next() -> None:
    """The CPU default (no wait, `Settings.batch_max_delay_ms`): a request runs as soon as the model is
    free, and requests that arrive while a batch runs share the next one, up to the size limit."""
    model = Recorder()
    model.release.clear()

    async def scenario() -> list[float]:
        async with MicroBatcher(model, max_batch_size=4, max_delay_ms=0) as batcher:
            lone = asyncio.create_task(batcher.submit(item(0)))
            await model_entered(model)  # it went alone, without waiting for a partner
            behind = [asyncio.create_task(batcher.submit(item(i))) for i in range(1, 6)]
            await until(lambda: batcher.queue_depth() == 5)
            model.release.set()
            return await asyncio.gather(lone, *behind)

    assert run(scenario()) == [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]
    assert model.sizes == [1, 4, 1]


def test_served_model_waits_for_a_fuller_batch_on_a_gpu_only_unless_told(tmp_path) -> None:  # noqa: ANN001
    from verity.api.registry import GPU_BATCH_DELAY_MS

    def delay(provider: str, **settings: object) -> float:
        return served_model(tmp_path, provider, **settings).batch_delay_ms()

    assert delay("CPUExecutionProvider") == 0.0
    assert delay("CUDAExecutionProvider") == GPU_BATCH_DELAY_MS > 0
    assert delay("CPUExecutionProvider", batch_max_delay_ms=7) == 7.0
    assert delay("CUDAExecutionProvider", batch_max_delay_ms=0) == 0.0


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1001"])
def test_a_batch_wait_that_could_hold_a_lone_request_for_ever_is_refused(value: str) -> None:
    from pydantic import ValidationError

    from verity.api.settings import Settings

    with pytest.raises(ValidationError, match="batch_max_delay_ms"):
        Settings(batch_max_delay_ms=value)
