"""MicroBatcher: gathering, the max-delay rule, per-waiter results, errors, overload and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from verity.inference.batcher import BatcherClosedError, BatchStats, MicroBatcher, QueueFullError


class Recorder:
    """A fake model: returns each input's first value times 10 and remembers the batch sizes."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.sizes: list[int] = []
        self.delay_s = delay_s
        self.fail = fail
        self.release = threading.Event()
        self.release.set()

    def __call__(self, batch: np.ndarray) -> list[float]:
        self.release.wait(5)
        self.sizes.append(len(batch))
        time.sleep(self.delay_s)
        if self.fail:
            raise ValueError("model exploded")
        return [float(x.flat[0]) * 10 for x in batch]


def item(value: float) -> np.ndarray:
    return np.full((1, 2, 2), value, dtype=np.float32)


def run(coro):  # noqa: ANN001, ANN201 - test helper
    return asyncio.run(coro)


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
    assert model.sizes == [3]
    assert 0.045 <= elapsed < 1.0


def test_delay_counts_from_the_oldest_request() -> None:
    model = Recorder()

    async def scenario() -> float:
        async with MicroBatcher(model, max_batch_size=8, max_delay_ms=80) as batcher:
            started = time.perf_counter()
            first = asyncio.create_task(batcher.submit(item(1)))
            await asyncio.sleep(0.06)
            second = asyncio.create_task(batcher.submit(item(2)))
            await asyncio.gather(first, second)
            return time.perf_counter() - started

    elapsed = run(scenario())
    assert model.sizes == [2]
    # Sent at about 80 ms after the first request, not 80 ms after the second (140 ms).
    assert elapsed < 0.13


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
            await asyncio.sleep(0.05)  # the worker takes them and blocks in the model
            queued = [asyncio.create_task(batcher.submit(item(i))) for i in range(2, 5)]
            await asyncio.sleep(0.01)
            assert batcher.queue_depth() == 3
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
        batcher = MicroBatcher(model, max_batch_size=2, max_delay_ms=1000)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(item(i))) for i in range(5)]
        await asyncio.sleep(0)
        await batcher.stop(drain=True)  # must not wait the 1 s delay for the last, partial batch
        with pytest.raises(BatcherClosedError):
            await batcher.submit(item(1))
        return await asyncio.gather(*tasks)

    started = time.perf_counter()
    assert run(scenario()) == [i * 10.0 for i in range(5)]
    assert time.perf_counter() - started < 0.8


def test_stop_without_drain_fails_queued_requests() -> None:
    model = Recorder()
    model.release.clear()

    async def scenario() -> list[object]:
        batcher = MicroBatcher(model, max_batch_size=1, max_delay_ms=0)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.submit(item(i))) for i in range(3)]
        await asyncio.sleep(0.05)  # first one is in the model, two are queued
        stopping = asyncio.create_task(batcher.stop(drain=False))
        await asyncio.sleep(0.01)
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


def test_served_model_runs_one_batch_worker_per_core_on_cpu_and_one_on_gpu(tmp_path) -> None:  # noqa: ANN001
    from verity.api.registry import ServedModel
    from verity.api.settings import Settings
    from verity.inference.engine import usable_cores

    class FakeEngine:
        def __init__(self, provider: str) -> None:
            self.providers = [provider]

    def workers(provider: str, **settings: object) -> int:
        served = ServedModel(FakeEngine(provider), tmp_path / "model.onnx", Settings(**settings))
        return served._batch_workers()

    assert workers("CPUExecutionProvider") == usable_cores() >= 1
    assert workers("CUDAExecutionProvider") == 1
    assert workers("CPUExecutionProvider", batch_workers=3) == 3
