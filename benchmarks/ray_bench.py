"""Ray Serve with 2 replicas against `verity serve --workers 2` on this box, side by side: the shipped
models, one PostgreSQL audit log (which Ray's replicas need, and which the workers then use too), a
640x480 photo JPEG as the raw body, a closed loop of CONCURRENCY clients for the same seconds each, the
two setups measured in turns (A, B, B, A) so that a machine that slows down slows both.

    .venv/bin/python benchmarks/ray_bench.py [--seconds 20] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the live-server and PostgreSQL helpers the tests use

from api_fixtures import LiveServer  # noqa: E402
from postgres_fixtures import start_postgres_or_exit  # noqa: E402
from ray_fixtures import local_ray_serve  # noqa: E402

from benchmarks.common import load_average, photo_jpeg  # noqa: E402
from benchmarks.pg_soak import closed_loop  # noqa: E402


@contextmanager
def workers(env: dict[str, str]) -> Iterator[str]:
    server = LiveServer(env, ["--workers", "2"]).start(timeout=180)
    try:
        yield server.url
    finally:
        server.stop()


def measure(url: str, image: bytes, concurrency: int, seconds: float) -> dict[str, Any]:
    statuses, _, latencies = asyncio.run(closed_loop(url, image, concurrency, seconds, lambda: None))
    latencies.sort()
    return {"ok_per_s": statuses["200"] / seconds, "statuses": dict(statuses),
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None}  # fmt: skip


def run(seconds: float, concurrency: int) -> dict[str, Any]:
    postgres = start_postgres_or_exit()
    work = Path(tempfile.mkdtemp(prefix="verity-ray-"))
    setups: dict[str, Callable[[dict[str, str]], Any]] = {"workers_2": workers,
                                                           "ray_2_replicas": local_ray_serve}  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in setups}
    try:
        audit = postgres.create_database("bench")
        env = {"VERITY_MODELS_DIR": str(ROOT / "checkpoints"), "VERITY_AUDIT_DB": audit,
               "VERITY_KEYS_FILE": str(work / "keys.json"), "VERITY_RATE_LIMIT_PER_S": "0"}  # fmt: skip
        image = photo_jpeg(640, 480, seed=3)
        for name in ("workers_2", "ray_2_replicas", "ray_2_replicas", "workers_2"):
            with setups[name](env) as url:
                time.sleep(2.0)
                results[name].append(measure(url, image, concurrency, seconds))
    finally:
        postgres.stop()
    mean = {name: sum(r["ok_per_s"] for r in runs) / len(runs) for name, runs in results.items()}
    ratio = mean["ray_2_replicas"] / mean["workers_2"]
    return {"seconds": seconds, "concurrency": concurrency, "runs": results, "ok_per_s": mean,
            "ray_over_workers": ratio, "load_average": load_average()}  # fmt: skip


def summary(figures: dict[str, Any]) -> str:
    mean = figures["ok_per_s"]
    return (f"Ray Serve, 2 replicas: {mean['ray_2_replicas']:.1f} answers/s against verity serve "
            f"--workers 2: {mean['workers_2']:.1f} ({figures['ray_over_workers']:.2f}x; concurrency "
            f"{figures['concurrency']}, {figures['seconds']:.0f} s a run, two runs each; load average "
            f"{figures['load_average']:.1f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    figures = run(args.seconds, args.concurrency)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
