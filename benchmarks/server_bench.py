"""Server throughput and p50/p99 latency at concurrency 1, 8, 32, with micro-batching on and off.

Starts the real service (`verity serve`, uvicorn with the app factory) on 127.0.0.1 in a subprocess
with settings from VERITY_* environment variables, and drives POST /v1/predict (multipart, a 224x224
photo-like JPEG, modality=photo) with `wrk` (a C load generator: closed loop, one connection per
concurrent client) when installed, else with a bounded async httpx client. Batching off is
VERITY_BATCH_MAX_SIZE=1; on is VERITY_BATCH_MAX_SIZE=8 with the default delay.

    .venv/bin/python benchmarks/server_bench.py --model checkpoints/photo-default/<version>/model.onnx
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, load_average, photo_jpeg  # noqa: E402

CONCURRENCY = (1, 8, 32)
WRK_SCRIPT = """
local f = assert(io.open(os.getenv("VERITY_BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = f:read("*a")
f:close()
wrk.headers["Content-Type"] = os.getenv("VERITY_BENCH_CONTENT_TYPE")
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'VERITY_JSON {"requests": %d, "duration_us": %d, "status_errors": %d, "connect_errors": %d, ' ..
    '"timeouts": %d, "read_errors": %d, "write_errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"mean_us": %.1f}\\n',
    summary.requests, summary.duration, e.status, e.connect, e.timeout, e.read, e.write,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean))
end
"""


def multipart_body(image: bytes) -> tuple[bytes, str]:
    """A /v1/predict form holding a photo, and the Content-Type that names its boundary."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="modality"\r\n\r\nphoto\r\n'.encode(),
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="item.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode()
        + image
        + b"\r\n",
        f"--{boundary}--\r\n".encode(),
    ]
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def served_modalities(models_dir: Path) -> list[str]:
    """The modalities of the models in a models folder (its cards), in Verity's order."""
    from verity.inference.artifacts import scan_model_files
    from verity.inference.engine import read_metadata
    from verity.inference.vocabulary import MODALITIES

    found = {read_metadata(path)[1].modality for path in scan_model_files(models_dir)}
    return [modality for modality in MODALITIES if modality in found] or list(MODALITIES)


class Server:
    """`verity serve` in a subprocess with the given settings; waits until /readyz says ready."""

    def __init__(
        self, models_dir: Path, workdir: Path, env: dict[str, str], args: tuple[str, ...] = ()
    ) -> None:
        self.args = list(args)  # more `verity serve` options, e.g. ("--workers", "2")
        self.port = free_port()
        self.log = workdir / f"server-{self.port}.log"
        self.env = {
            **os.environ,
            "VERITY_MODELS_DIR": str(models_dir),
            "VERITY_AUDIT_DB": str(workdir / f"audit-{self.port}.sqlite"),
            "VERITY_KEYS_FILE": str(workdir / "keys.json"),
            "VERITY_LOG_LEVEL": "warning",
            "VERITY_RATE_LIMIT_PER_S": "0",  # one client measuring capacity, not a station to hold back
            # Nor its decode share: a load run's clients are one key, and the requests a run leaves in
            # flight when it stops would otherwise fill that key's queue for the next run (429s).
            "VERITY_DECODE_QUEUE_PER_KEY": "4096",
            # Ready once the modalities it has models for are served (a benchmark often has one only).
            "VERITY_MODALITIES": ",".join(served_modalities(models_dir)),
            **env,
        }
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        verity = str(Path(sys.executable).with_name("verity"))
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [verity, "serve", "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning",
                 *self.args],  # fmt: skip
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            self._wait_ready()
        except BaseException:  # a server that never got ready is not left running
            self.__exit__()
            raise
        return self

    def _wait_ready(self, timeout_s: float = 180.0) -> None:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"The server exited early; see {self.log}:\n{self.log.read_text()[-2000:]}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"The server was not ready within {timeout_s:.0f} s; see {self.log}.")

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()


def run_wrk(
    url: str, body_path: Path, content_type: str, concurrency: int, seconds: float, script: Path,
    path: str = "/v1/predict",
) -> dict:
    """A closed loop of `concurrency` connections POSTing the body for `seconds` (WRK_SCRIPT)."""
    env = {**os.environ, "VERITY_BENCH_BODY": str(body_path), "VERITY_BENCH_CONTENT_TYPE": content_type}
    command = [
        "wrk",
        "-t",
        str(min(concurrency, 2)),
        "-c",
        str(concurrency),
        "-d",
        f"{seconds:.0f}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        f"{url}{path}",
    ]
    out = subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=seconds + 60, check=True
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("VERITY_JSON "))
    raw = json.loads(line.removeprefix("VERITY_JSON "))
    duration = raw["duration_us"] / 1e6
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / duration,
        "p50_ms": raw["p50_us"] / 1000,
        "p90_ms": raw["p90_us"] / 1000,
        "p99_ms": raw["p99_us"] / 1000,
        "errors": sum(raw[kind] for kind in ("status_errors", "connect_errors", "timeouts", "read_errors",
                                             "write_errors")),
        "load_generator": "wrk",
    }


async def _httpx_load(url: str, body: bytes, content_type: str, concurrency: int, seconds: float) -> dict:
    import httpx

    latencies: list[float] = []
    errors = 0
    headers = {"Content-Type": content_type}
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=10) as client:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                try:
                    response = await client.post("/v1/predict", content=body, headers=headers)
                    ok = response.status_code == 200
                except httpx.HTTPError:
                    ok = False
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    values = np.array(latencies) * 1000
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50_ms": float(np.percentile(values, 50)),
        "p90_ms": float(np.percentile(values, 90)),
        "p99_ms": float(np.percentile(values, 99)),
        "errors": errors,
        "load_generator": "httpx",
    }


def run(model: Path, workdir: Path, seconds: float = 6.0, label: str = "fp32") -> dict[str, Any]:
    """One server per batching setting; concurrency 1, 8, 32 against each."""
    version = workdir / f"models-{label}" / "bench-photo" / "0.0.0"
    version.mkdir(parents=True, exist_ok=True)
    for sidecar in model.parent.iterdir():  # what a model's card may name beside it (a gate's bank)
        if sidecar.is_file() and sidecar.suffix != ".onnx":
            shutil.copy(sidecar, version / sidecar.name)
    shutil.copy(model, version / "model.onnx")
    models_dir = version.parents[1]
    image = photo_jpeg(224, 224, seed=3)
    body, content_type = multipart_body(image)
    body_path = workdir / "body.bin"
    body_path.write_bytes(body)
    script = workdir / "post.lua"
    script.write_text(WRK_SCRIPT)
    use_wrk = shutil.which("wrk") is not None
    rows = []
    for batching, env in (("off", {"VERITY_BATCH_MAX_SIZE": "1"}), ("on", {"VERITY_BATCH_MAX_SIZE": "8"})):
        with Server(models_dir, workdir, env) as server:
            for concurrency in CONCURRENCY:
                if use_wrk:
                    run_wrk(server.url, body_path, content_type, concurrency, 2, script)  # warm-up, discarded
                    result = run_wrk(server.url, body_path, content_type, concurrency, seconds, script)
                else:
                    asyncio.run(_httpx_load(server.url, body, content_type, concurrency, 2))
                    result = asyncio.run(_httpx_load(server.url, body, content_type, concurrency, seconds))
                rows.append({"model": label, "batching": batching, "concurrency": concurrency, **result})
    by = {(r["batching"], r["concurrency"]): r for r in rows}
    return {
        "model": label,
        "image": "224x224 photo-like JPEG",
        "rows": rows,
        "batching_gain_c32": by[("on", 32)]["rps"] / by[("off", 32)]["rps"],
        "p99_ms_c32_batching_on": by[("on", 32)]["p99_ms"],
        "targets": {"batching_gain_c32": 2.0, "p99_ms_c32": 100.0},
        "load_average": load_average(),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a Verity model.onnx (or model.int8.onnx)")
    parser.add_argument("--seconds", type=float, default=6.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(run(Path(args.model), Path(work), args.seconds), indent=2))
