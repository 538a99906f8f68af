"""What a shadow model (VERITY_SHADOW) costs the answers: p50 and p99 latency of /v1/predict on two
servers side by side, one with a shadow and one without, the same models and image, requests alternating
between them (ABBA), so that a machine that slows down slows both.

The shipped photo model is its own shadow here: the same work a candidate of the same architecture does.
The shadow scores after the verdict is recorded, through a bounded queue that drops rather than waits
(api/shadow.py); the target is a p50 at most 10% above the server without one.

    .venv/bin/python benchmarks/shadow_cost.py [--rounds 40] [--batch 10]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_average, photo_jpeg  # noqa: E402
from benchmarks.server_bench import Server  # noqa: E402

TARGET = 0.10


def run(workdir: Path, rounds: int = 40, batch: int = 10, models: Path = ROOT / "checkpoints",
        shadow: str = "photo-default/1.0.0") -> dict[str, Any]:  # fmt: skip
    """Median and p99 latency (ms) of each server's /v1/predict, and the shadow's added share at p50."""
    import httpx

    image = photo_jpeg(1024, 768, seed=4)
    latencies: dict[str, list[float]] = {"shadow": [], "plain": []}
    shadowed = Server(models, workdir, {"VERITY_SHADOW": shadow})
    with shadowed as with_shadow, Server(models, workdir, {}) as plain:
        servers = {"shadow": with_shadow, "plain": plain}
        with httpx.Client(timeout=30) as client:

            def send(name: str, count: int, keep: bool) -> None:
                for _ in range(count):
                    started = time.perf_counter()
                    response = client.post(servers[name].url + "/v1/predict", data={"modality": "photo"},
                                           files={"file": ("label.jpg", image)})  # fmt: skip
                    response.raise_for_status()
                    if keep:
                        latencies[name].append((time.perf_counter() - started) * 1000)

            for name in servers:  # warm-up, not counted
                send(name, 5, keep=False)
            for number in range(rounds):
                for name in ("shadow", "plain") if number % 2 == 0 else ("plain", "shadow"):
                    send(name, batch, keep=True)
            metrics = client.get(with_shadow.url + "/metrics").text
    figures = {
        name: {"p50_ms": statistics.median(values), "p99_ms": sorted(values)[int(len(values) * 0.99) - 1]}
        for name, values in latencies.items()
    }
    scored = [line for line in metrics.splitlines() if line.startswith("verity_shadow_total{")]
    return {
        **figures,
        "requests_each": rounds * batch,
        "p50_added_share": figures["shadow"]["p50_ms"] / figures["plain"]["p50_ms"] - 1.0,
        "shadow_outcomes": scored,
        "load_average": load_average(),
    }


def summary(figures: dict[str, Any]) -> str:
    share = figures["p50_added_share"]
    return (
        f"shadow scoring: /v1/predict p50 {figures['plain']['p50_ms']:.1f} -> "
        f"{figures['shadow']['p50_ms']:.1f} ms "
        f"({share:+.1%}; target <= +{TARGET:.0%}), p99 {figures['plain']['p99_ms']:.1f} -> "
        f"{figures['shadow']['p99_ms']:.1f} ms over {figures['requests_each']} requests each "
        f"(load average {figures['load_average']:.1f})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--batch", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        figures = run(Path(work), args.rounds, args.batch)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
