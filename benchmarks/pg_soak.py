"""A soak: `verity serve --workers 2` on a PostgreSQL audit log, closed loop at concurrency 32 for 60 s.

What an operator needs to trust before a busy post goes live: under a sustained load there are no errors
but explicit 503 (busy) or 429 (rate limited), the memory of the server (supervisor and workers, RSS
summed from /proc) grows by at most 10% between the end of the warm-up and the end of the run, and every
200 is in the audit log exactly once. Latency is given twice: as the client saw it, and as the server's
access log has it (the Python client shares the cores, and its own queueing is most of its tail).

PostgreSQL is a real server: Debian's `postgresql` (initdb and pg_ctl in a temporary folder on a loopback
port, as the tests start it: tests/postgres_fixtures.py). The models are the shipped ones; the image a
1024x768 photo JPEG sent as the raw body; the per-key rate limit off, as for a single-client benchmark.

    .venv/bin/python benchmarks/pg_soak.py [--seconds 60] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the live-server and PostgreSQL helpers the tests use

from api_fixtures import LiveServer  # noqa: E402
from postgres_fixtures import start_postgres_or_exit  # noqa: E402

from benchmarks.common import load_average, photo_jpeg  # noqa: E402

WARM_UP_S = 5.0
RSS_GROWTH_LIMIT = 0.10
ACCEPTED = {200, 429, 503}  # a busy or limited answer is explicit; anything else is an error


def server_rss_mb(supervisor: int) -> float:
    """Resident memory of the supervisor and every process below it, in MB (from /proc)."""
    pids, total = [supervisor], 0.0
    while pids:
        pid = pids.pop()
        try:
            status = Path(f"/proc/{pid}/status").read_text()
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        total += next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")) / 1024
        pids += [int(child) for child in children]
    return total


async def closed_loop(url: str, image: bytes, concurrency: int, seconds: float,
                      on_warm: Any) -> tuple[Counter[str], list[str], list[float]]:  # fmt: skip
    """`concurrency` clients, each sending its next request when the last is answered."""
    import httpx

    statuses: Counter[str] = Counter()
    answered: list[str] = []
    latencies: list[float] = []
    started = time.monotonic()
    warm = asyncio.Event()

    async def client(http: httpx.AsyncClient) -> None:
        while time.monotonic() - started < seconds:
            if not warm.is_set() and time.monotonic() - started >= WARM_UP_S:
                warm.set()
                on_warm()
            sent = time.monotonic()
            try:
                response = await http.post("/v1/predict", params={"modality": "photo"}, content=image,
                                           headers={"Content-Type": "image/jpeg"})  # fmt: skip
            except httpx.HTTPError as error:
                statuses[type(error).__name__] += 1
                continue
            statuses[str(response.status_code)] += 1
            if response.status_code == 200:
                answered.append(response.json()["request_id"])
                if time.monotonic() - started >= WARM_UP_S:
                    latencies.append(time.monotonic() - sent)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
    return statuses, answered, latencies


def server_latencies_ms(access_log: Path) -> list[float]:
    """Every /v1/predict answer's latency as the server measured it (its access log): without the
    client's own queueing, which on the same cores is most of a Python client's tail."""
    found = []
    for line in access_log.read_text(encoding="utf-8").splitlines():
        if '"logger": "verity.api.access"' in line and '"path": "/v1/predict"' in line:
            found.append(float(json.loads(line)["latency_ms"]))
    return sorted(found)


def audited_once(url: str, request_ids: list[str]) -> bool:
    import psycopg

    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT request_id, count(*) FROM predictions WHERE request_id = ANY(%s) GROUP BY request_id",
            (request_ids,),
        ).fetchall()
    return dict(rows) == dict.fromkeys(request_ids, 1)


def run(seconds: float, concurrency: int) -> dict[str, Any]:
    postgres = start_postgres_or_exit()
    work = Path(tempfile.mkdtemp(prefix="verity-soak-"))
    try:
        url = postgres.create_database("soak")
        env = {"VERITY_MODELS_DIR": str(ROOT / "checkpoints"), "VERITY_AUDIT_DB": url,
               "VERITY_KEYS_FILE": str(work / "keys.json"), "VERITY_RATE_LIMIT_PER_S": "0"}  # fmt: skip
        server = LiveServer(env, ["--workers", "2"]).start(timeout=180)
        assert server.process is not None
        rss: dict[str, float] = {}
        try:
            image = photo_jpeg(1024, 768, seed=5)

            def warm() -> None:
                rss["after_warm_up_mb"] = server_rss_mb(server.process.pid)  # type: ignore[union-attr]

            load = closed_loop(server.url, image, concurrency, seconds, warm)
            statuses, answered, latencies = asyncio.run(load)
            rss["end_mb"] = server_rss_mb(server.process.pid)
        finally:
            server.stop()
        latencies.sort()
        served = server_latencies_ms(server.log_path)
        errors = {status: count for status, count in statuses.items() if not status.isdigit()
                  or int(status) not in ACCEPTED}  # fmt: skip
        growth = rss["end_mb"] / rss["after_warm_up_mb"] - 1.0
        return {
            "seconds": seconds,
            "concurrency": concurrency,
            "statuses": dict(statuses),
            "errors": errors,
            "req_per_s": statuses["200"] / seconds,
            "p50_ms": 1000 * latencies[len(latencies) // 2] if latencies else None,
            "p99_ms": 1000 * latencies[int(len(latencies) * 0.99)] if latencies else None,
            "server_p50_ms": served[len(served) // 2] if served else None,
            "server_p99_ms": served[int(len(served) * 0.99)] if served else None,
            "rss_after_warm_up_mb": round(rss["after_warm_up_mb"], 1),
            "rss_end_mb": round(rss["end_mb"], 1),
            "rss_growth": round(growth, 4),
            "every_200_audited_once": audited_once(url, answered),
            "meets": not errors and growth <= RSS_GROWTH_LIMIT,
            "load_average": load_average(),
        }
    finally:
        postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    if not args.seconds > WARM_UP_S:  # the memory growth is measured from the end of the warm-up
        parser.error(f"--seconds must be more than the {WARM_UP_S:.0f} s warm-up")
    print(json.dumps(run(args.seconds, args.concurrency), indent=2))


if __name__ == "__main__":
    main()
