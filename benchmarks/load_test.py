"""Bounded load test of the HTTP service on loopback.

Starts `verity serve` on a free port (or targets --url), sends /v1/predict requests from
--concurrency workers for --duration seconds, and prints throughput, latency percentiles, status
counts and the server's resident memory. Passes (exit 0) when every answer is a 200 or an explicit
503 (capacity) and RSS grows at most --max-rss-growth from the 10th second to the end.

    .venv/bin/python benchmarks/load_test.py --duration 60 --concurrency 32 --models-dir checkpoints
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def sample_jpeg(width: int = 1024, height: int = 768, seed: int = 0) -> bytes:
    """A photo-sized JPEG with texture (so decoding costs what a real upload costs)."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 255, width, dtype=np.float32)[None, :, None].repeat(height, 0).repeat(3, 2)
    noise = rng.normal(0, 20, (height, width, 3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(
    models_dir: str, workdir: Path, extra_env: dict[str, str] | None = None
) -> tuple[subprocess.Popen, str]:
    """`verity serve` on a free loopback port with its audit log and keys in `workdir`, once ready."""
    port = free_port()
    env = {
        **os.environ,
        "VERITY_MODELS_DIR": models_dir,
        "VERITY_AUDIT_DB": str(workdir / "audit.sqlite"),
        "VERITY_KEYS_FILE": str(workdir / "keys.json"),
        "VERITY_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    log = open(workdir / "server.log", "wb")  # noqa: SIM115 - lives as long as the server
    process = subprocess.Popen(
        [sys.executable, "-m", "verity", "serve", "--port", str(port)],
        cwd=REPO,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited: {(workdir / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise RuntimeError("server not ready after 120 s")


async def run_load(
    url: str, image: bytes, modality: str, duration: float, concurrency: int, pid: int | None
) -> dict:
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    server_ms: list[float] = []  # time inside the server, as the response reports it
    rss: list[tuple[float, int]] = []
    started = time.monotonic()
    end = started + duration

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                response = await client.post(
                    "/v1/predict",
                    data={"modality": modality},
                    files={"file": ("load.jpg", image, "image/jpeg")},
                )
                statuses[str(response.status_code)] += 1
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    server_ms.append(response.json()["latency_ms"])
            except httpx.HTTPError as error:
                statuses[f"transport:{type(error).__name__}"] += 1

    async def sampler() -> None:
        while time.monotonic() < end and pid is not None:
            rss.append((time.monotonic() - started, rss_bytes(pid)))
            await asyncio.sleep(1.0)
        if pid is not None:
            rss.append((time.monotonic() - started, rss_bytes(pid)))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:
        await asyncio.gather(sampler(), *(worker(client) for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    return {
        "statuses": statuses,
        "latencies": latencies,
        "server_ms": server_ms,
        "rss": rss,
        "elapsed": elapsed,
    }


def report(result: dict, max_growth: float) -> tuple[dict, bool]:
    statuses, latencies = result["statuses"], np.array(result["latencies"]) * 1000
    total = sum(statuses.values())
    bad = {k: v for k, v in statuses.items() if k not in ("200", "503")}
    figures: dict = {
        "requests": total,
        "ok": statuses.get("200", 0),
        "rejected_503": statuses.get("503", 0),
        "errors": bad,
        "seconds": round(result["elapsed"], 1),
        "throughput_rps": round(statuses.get("200", 0) / result["elapsed"], 1),
    }
    if latencies.size:
        figures.update({f"p{q}_ms": round(float(np.percentile(latencies, q)), 1) for q in (50, 95, 99)})
        figures["server_p50_ms"] = round(float(np.percentile(result["server_ms"], 50)), 1)
    passed = not bad and statuses.get("200", 0) > 0
    if result["rss"]:
        at_10 = next((value for t, value in result["rss"] if t >= 10), result["rss"][0][1])
        last = result["rss"][-1][1]
        growth = (last - at_10) / at_10
        figures.update(
            {
                "rss_at_10s_mb": round(at_10 / 2**20, 1),
                "rss_end_mb": round(last / 2**20, 1),
                "rss_growth_pct": round(growth * 100, 2),
            }
        )
        passed = passed and growth <= max_growth
    figures["passed"] = passed
    return figures, passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="an already running server (RSS is then not measured unless --pid)")
    parser.add_argument("--pid", type=int, help="server process id, to measure RSS of a --url server")
    parser.add_argument(
        "--models-dir", default="checkpoints", help="models for the server this script starts"
    )
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--modality", default="photo", choices=["photo", "xray"])
    parser.add_argument("--image", help="image file to send (default: a synthetic 1024x768 JPEG)")
    parser.add_argument("--max-rss-growth", type=float, default=0.10)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    image = Path(args.image).read_bytes() if args.image else sample_jpeg()
    process = None
    with tempfile.TemporaryDirectory(prefix="verity-load-") as workdir:
        if args.url:
            url, pid = args.url, args.pid
        else:
            # One client measuring capacity, not a station to hold back: no per-key rate limit.
            process, url = start_server(args.models_dir, Path(workdir), {"VERITY_RATE_LIMIT_PER_S": "0"})
            pid = process.pid
        try:
            result = asyncio.run(run_load(url, image, args.modality, args.duration, args.concurrency, pid))
        finally:
            if process is not None:
                process.terminate()
                process.wait(timeout=60)
    figures, passed = report(result, args.max_rss_growth)
    figures.update({"concurrency": args.concurrency, "image_bytes": len(image), "modality": args.modality})
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
