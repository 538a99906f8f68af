"""What the service costs besides the model: CPU per request with a trivial model, by thread.

Starts the real service (as server_bench does) with the tiny contract model (one 4x4 convolution, well
under a millisecond), drives POST /v1/predict with 224x224 JPEGs at concurrency 32 with wrk, and reads
the server's per-thread CPU time from /proc before and after. The event-loop thread runs all the
HTTP, FastAPI and response work while holding the GIL; the other threads decode and write the audit log.

    .venv/bin/python benchmarks/server_overhead.py [--seconds 6]
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, photo_jpeg, print_run  # noqa: E402
from benchmarks.server_bench import WRK_SCRIPT, Server, multipart_body, run_wrk  # noqa: E402

CONCURRENCY = 32


def thread_cpu_seconds(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of each thread of `pid`."""
    ticks = os.sysconf("SC_CLK_TCK")
    times: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the thread ended meanwhile
        times[int(tid)] = (int(fields[11]) + int(fields[12])) / ticks
    return times


def run(workdir: Path, seconds: float = 6.0) -> dict[str, Any] | None:
    """None where this cannot be measured (no wrk, or no /proc)."""
    from benchmarks.models import tiny_onnx, tiny_spec

    if shutil.which("wrk") is None or not Path("/proc/self/task").is_dir():
        return None
    spec = tiny_spec("photo")
    tiny_onnx(workdir / "models" / "tiny-photo" / "0.0.0" / "model.onnx", spec)
    body, content_type = multipart_body(photo_jpeg(224, 224, seed=3))
    body_path = workdir / "body.bin"
    body_path.write_bytes(body)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    with Server(workdir / "models", workdir, {}) as server:
        assert server.process is not None
        pid = server.process.pid
        run_wrk(server.url, body_path, content_type, CONCURRENCY, 2, script)  # warm-up, discarded
        before = thread_cpu_seconds(pid)
        result = run_wrk(server.url, body_path, content_type, CONCURRENCY, seconds, script)
        after = thread_cpu_seconds(pid)
    used = {tid: after[tid] - before.get(tid, 0.0) for tid in after}
    requests = max(1, result["requests"])
    total = sum(used.values())
    return {
        "model": f"tiny contract model, {spec.image_size} px",
        "image": "224x224 photo-like JPEG",
        "concurrency": CONCURRENCY,
        "rps": result["rps"],
        "p50_ms": result["p50_ms"],
        "errors": result["errors"],
        "cpu_ms_per_request": total / requests * 1000,
        # The main thread is the asyncio event loop (uvicorn runs it there).
        "event_loop_cpu_ms_per_request": used.get(pid, 0.0) / requests * 1000,
        "cores_used": total / seconds,
        "load_average": load_average(),
    }


if __name__ == "__main__":
    print_run(run, __doc__.splitlines()[0], seconds=6.0)
