"""Where a served answer's tail comes from, besides the model: the measurements behind the heap freeze
(api/registry.freeze_long_lived), the raw-body route (api/routes/v1.RawImageRoute) and the c=32 tail of
`verity serve --workers 2` (README, "Scaling out").

- in process (the shipped photo model, TestClient): a full `gc.collect()` of the started app's heap,
  before and after `gc.freeze()`, and the gen-2 collections (with their pauses) over a run of requests
  with the heap not frozen; FastAPI's dependency solving per /v1/predict, for a raw image body and for
  a multipart form, and the share of it spent on the form's fields (`request_body_to_args`);
- on the real service: `verity serve --workers N` under a closed loop at concurrency 32 (`wrk`), with
  how the connections split between the worker processes (read from /proc while the load runs), the
  answers a second and the p99 against the Little's-law mean, for a few runs; with the workers'
  least-connections hand-off on, off (VERITY_BALANCE_CONNECTIONS=false), or both in turns, and with
  keep-alive clients or clients that open a connection for every request (`--close`).

    .venv/bin/python benchmarks/server_tail.py [--requests 1000] [--runs 5] [--workers 2]
        [--balance on|off|both] [--close]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import photo_jpeg  # noqa: E402
from benchmarks.server_bench import WRK_SCRIPT, Server, run_wrk  # noqa: E402

IMAGE = dict(width=640, height=480, seed=3)
QUERY = "/v1/predict?modality=photo"


def in_process(requests: int) -> dict[str, Any]:
    """The heap's collection with and without the freeze, and the dependency solving per request."""
    import fastapi.dependencies.utils as fastapi_utils
    import fastapi.routing as fastapi_routing
    from fastapi.testclient import TestClient

    from verity.api.app import create_app
    from verity.api.settings import Settings

    work = Path(tempfile.mkdtemp(prefix="verity-tail-"))
    settings = Settings(models_dir=ROOT / "checkpoints", audit_db=str(work / "audit.sqlite"),
                        keys_file=work / "keys.json", modalities=["photo"], background_load=False,
                        rate_limit_per_s=0, gc_freeze=False)  # fmt: skip
    image = photo_jpeg(**IMAGE)
    timed = {"dependencies": 0.0, "form fields": 0.0}

    def timing(function: Any, name: str) -> Any:
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await function(*args, **kwargs)
            finally:
                timed[name] += time.perf_counter() - started

        return wrapper

    with TestClient(create_app(settings), base_url="http://127.0.0.1") as client:
        raw = lambda: client.post(QUERY, content=image, headers={"content-type": "image/jpeg"})  # noqa: E731
        form = lambda: client.post("/v1/predict", data={"modality": "photo"}, files={"file": image})  # noqa: E731
        for send in (raw, form):
            for _ in range(20):
                send().raise_for_status()
        objects = len(gc.get_objects())
        collect_ms = _collect_ms()
        pauses = _gen2_pauses(raw, requests)
        gc.freeze()
        frozen_ms = _collect_ms()
        gc.unfreeze()
        originals = fastapi_routing.solve_dependencies, fastapi_utils.request_body_to_args
        fastapi_routing.solve_dependencies = timing(originals[0], "dependencies")
        fastapi_utils.request_body_to_args = timing(originals[1], "form fields")
        try:
            solving = {}
            for name, send in (("raw body", raw), ("multipart form", form)):
                timed.update(dict.fromkeys(timed, 0.0))
                for _ in range(200):
                    send().raise_for_status()
                solving[name] = {key: value / 200 * 1000 for key, value in timed.items()}
        finally:
            fastapi_routing.solve_dependencies, fastapi_utils.request_body_to_args = originals
    return {"heap_objects": objects, "full_collect_ms": collect_ms, "full_collect_frozen_ms": frozen_ms,
            "requests": requests, "gen2_pauses_ms": pauses, "dependency_ms_per_request": solving}  # fmt: skip


def _collect_ms() -> float:
    times = []
    for _ in range(3):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def _gen2_pauses(send: Any, requests: int) -> list[float]:
    """The pause of each full collection that `requests` requests set off on their own."""
    pauses: list[float] = []
    started = [0.0]

    def watch(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        elif info["generation"] == 2:
            pauses.append((time.perf_counter() - started[0]) * 1000)

    gc.callbacks.append(watch)
    try:
        for _ in range(requests):
            send().raise_for_status()
    finally:
        gc.callbacks.remove(watch)
    return pauses


def connections_by_worker(server_pid: int, port: int) -> list[int]:
    """Established connections to `port` held by each child of the server process, fewest first."""
    inodes = _established_inodes(port)
    held: Counter[int] = Counter()
    for pid in _children(server_pid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                held[pid] += 1
    return sorted(held.values())


def _established_inodes(port: int) -> set[str]:
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "01":  # ESTABLISHED, the server's side
                found.add(fields[9])
    return found


def _children(pid: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return children


def served(
    runs: int, workers: int, balance: str = "on", close: bool = False, seconds: float = 15.0
) -> list[dict[str, Any]]:
    """Each run: a fresh `verity serve --workers N`, a warm-up, then c=32 while the split is read. With
    `balance` "both", runs alternate between the hand-off on and off (each run's row says which)."""
    work = Path(tempfile.mkdtemp(prefix="verity-tail-serve-"))
    body, script = work / "body.jpg", work / "post.lua"
    body.write_bytes(photo_jpeg(**IMAGE))
    script.write_text(WRK_SCRIPT + ('wrk.headers["Connection"] = "close"\n' if close else ""))
    rows = []
    for number in range(runs):
        balanced = balance == "on" or (balance == "both" and number % 2 == 0)
        env = {"VERITY_MODALITIES": "photo", "VERITY_BALANCE_CONNECTIONS": str(balanced).lower()}
        options = ("--workers", str(workers))
        with Server(ROOT / "checkpoints", work, env, options) as server:
            assert server.process is not None
            run_wrk(server.url, body, "image/jpeg", 8, 3, script, QUERY)
            result: dict[str, Any] = {}
            arguments = (server.url, body, "image/jpeg", 32, seconds, script, QUERY)
            load = threading.Thread(target=lambda out=result, a=arguments: out.update(run_wrk(*a)))
            load.start()
            time.sleep(seconds / 2)
            split = connections_by_worker(server.process.pid, server.port)
            load.join()
        little_ms = 32 / result["rps"] * 1000
        rows.append({"split": split, "rps": result["rps"], "p99_ms": result["p99_ms"],
                     "p99_over_little": result["p99_ms"] / little_ms, "balanced": balanced,
                     "new_connection_per_request": close})  # fmt: skip
    return rows


def summary(figures: dict[str, Any]) -> str:
    inside = figures["in_process"]
    solving = inside["dependency_ms_per_request"]
    pauses = inside["gen2_pauses_ms"]
    lines = [
        f"heap of the started app: {inside['heap_objects']:,} objects; a full collection "
        f"{inside['full_collect_ms']:.1f} ms, {inside['full_collect_frozen_ms']:.1f} ms once frozen; "
        f"{len(pauses)} full collections in {inside['requests']} requests unfrozen "
        f"({', '.join(f'{p:.0f}' for p in pauses) or 'none'} ms)",
        "FastAPI's dependency solving per /v1/predict: " + "; ".join(
            f"{name} {ms['dependencies']:.2f} ms (form fields {ms['form fields']:.2f})"
            for name, ms in solving.items()
        ),
    ]
    for row in figures.get("served", []):
        how = ("balanced" if row["balanced"] else "not balanced") + (
            ", a new connection per request" if row["new_connection_per_request"] else ""
        )
        lines.append(
            f"verity serve --workers {figures['workers']} at c=32 ({how}): connections "
            f"{'/'.join(map(str, row['split'])) or 'none open'}, {row['rps']:.1f} req/s, p99 "
            f"{row['p99_ms']:.0f} ms = {row['p99_over_little']:.2f}x the Little's-law mean"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=5, help="served runs at c=32 (0: in process only)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--balance", choices=["on", "off", "both"], default="on",
                        help="the workers' least-connections hand-off (both: runs take turns)")  # fmt: skip
    parser.add_argument("--close", action="store_true", help="a new connection for every request")
    args = parser.parse_args()
    figures: dict[str, Any] = {"in_process": in_process(args.requests), "workers": args.workers}
    if args.runs:
        figures["served"] = served(args.runs, args.workers, args.balance, args.close)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
