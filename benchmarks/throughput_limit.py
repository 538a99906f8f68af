"""`verity serve` at its best setting on this box against the box's own limit and a naive server: the
same model file and image, in one run (issue 24's throughput line).

- limit: what the box does without HTTP: decode + preprocess + the engine, one thread per core, each
  decoding 8 images and scoring them as one batch, in images per second; for the fp32 model that
  serves, and for its INT8 quantization (static QDQ, calibrated on 16 photos here), with the reasons its
  card gives for serving fp32 when the INT8 gate failed; the fp32 limit is measured before and after
  the servers, and the share is taken of the mean;
- naive: one process (uvicorn, one Starlette route) that decodes and scores each request alone, with
  no batching, no audit log and no checks;
- verity: `verity serve --workers <cores>`, batching on, every answer audited (SQLite).

Each server gets closed loops at concurrency 32 and 4 from `wrk` (apt-get install wrk; a C load
generator, light beside the servers), the image as the raw body. Targets at c=32: at least 0.9 of the
limit, and p99 at most 1.5x the Little's-law mean (32 / req/s); at c=4: p99 at most 50 ms. Run it on a
quiet box: the figures are shares of what the cores can do.

    .venv/bin/python benchmarks/throughput_limit.py [--seconds 15]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import int8_gate, load_average, photo_jpeg  # noqa: E402
from benchmarks.server_bench import WRK_SCRIPT, Server, free_port, run_wrk  # noqa: E402

SHARE_TARGET, LITTLE_FACTOR, C4_P99_MS = 0.9, 1.5, 50.0
NAIVE_APP = """
import os
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from verity.inference.engine import OnnxEngine
from verity.inference.preprocess import load_for_model

engine = OnnxEngine(os.environ["NAIVE_MODEL"], intra_op_threads=1)

async def predict(request):
    data = await request.body()
    prediction = engine.predict([load_for_model(data, engine.spec)])[0]
    return JSONResponse({"score": prediction.score})

app = Starlette(routes=[Route("/v1/predict", predict, methods=["POST"])])
"""


def box_limit(model: Path, image: bytes, seconds: float, cores: int) -> float:
    """Images per second that decoding and the engine reach on every core, without HTTP."""
    import numpy as np

    from verity.inference.engine import OnnxEngine
    from verity.inference.preprocess import load_for_model

    engine = OnnxEngine(model, intra_op_threads=1)
    counts = [0] * cores
    stop = time.perf_counter() + seconds

    def work(slot: int) -> None:
        while time.perf_counter() < stop:
            engine.predict(np.stack([load_for_model(image, engine.spec) for _ in range(8)]))
            counts[slot] += 8

    threads = [threading.Thread(target=work, args=(slot,)) for slot in range(cores)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.perf_counter() - started)


def int8_limit(model: Path, image: bytes, seconds: float, cores: int, workdir: Path) -> dict[str, Any]:
    """The box's limit for the INT8 quantization of `model`, and whether the shipped INT8 passed its gate
    (VERITY_PRECISION=auto serves it only then)."""
    import numpy as np

    from verity.inference.engine import read_metadata
    from verity.inference.preprocess import load_for_model
    from verity.training.quantize import quantize_static_model

    spec, _ = read_metadata(model)
    calibration = np.stack([load_for_model(photo_jpeg(seed=seed), spec) for seed in range(16)])
    folder = workdir / "int8"  # beside the files the engine loads with a model (its bank and profiles)
    shutil.copytree(model.parent, folder, ignore=shutil.ignore_patterns("*.onnx", "*.pt"))
    int8 = folder / "model.int8.onnx"
    quantize_static_model(model, int8, calibration)
    gate = int8_gate(model.parent / "card.json")
    return {"limit_images_per_s": box_limit(int8, image, seconds, cores), **gate}


def load(url: str, body: Path, script: Path, seconds: float) -> dict[int, dict[str, Any]]:
    """A raw JPEG body (options in the query) at concurrency 32 and 4, after a warm-up."""

    def wrk(concurrency: int, seconds: float) -> dict[str, Any]:
        return run_wrk(url, body, "image/jpeg", concurrency, seconds, script, "/v1/predict?modality=photo")

    wrk(8, 3)  # warm-up, discarded
    return {c: {"concurrency": c, **wrk(c, seconds)} for c in (32, 4)}


class NaiveServer:
    def __init__(self, model: Path, workdir: Path) -> None:
        self.port, self.workdir, self.model = free_port(), workdir, model
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> NaiveServer:
        import httpx

        (self.workdir / "naive_app.py").write_text(NAIVE_APP)
        env = {**os.environ, "NAIVE_MODEL": str(self.model), "PYTHONPATH": str(self.workdir)}
        command = [sys.executable, "-m", "uvicorn", "naive_app:app", "--host", "127.0.0.1",
                   "--port", str(self.port), "--log-level", "warning"]  # fmt: skip
        self.process = subprocess.Popen(command, env=env, cwd=self.workdir)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(f"{self.url}/v1/predict", timeout=2)  # any answer (405: POST only) means up
                return self
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the naive server did not start")

    def __exit__(self, *exc: object) -> None:
        self.process.terminate()
        self.process.wait(timeout=20)


def run(seconds: float) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install wrk.")
    cores = os.cpu_count() or 1
    model = next((ROOT / "checkpoints" / "photo-default").glob("*/model.onnx"))
    image = photo_jpeg(640, 480, seed=3)
    with tempfile.TemporaryDirectory(prefix="verity-limit-") as work:
        workdir = Path(work)
        body, script = workdir / "body.jpg", workdir / "post.lua"
        body.write_bytes(image)
        script.write_text(WRK_SCRIPT)
        before = box_limit(model, image, seconds, cores)
        int8 = int8_limit(model, image, seconds, cores, workdir)
        with NaiveServer(model, workdir) as naive:
            naive_rows = load(naive.url, body, script, seconds)
        options = ("--workers", str(cores))
        with Server(ROOT / "checkpoints", workdir, {"VERITY_MODALITIES": "photo"}, options) as server:
            verity_rows = load(server.url, body, script, seconds)
        # Measured again after the servers: these shared cores change speed by a quarter within minutes,
        # so the share is taken of the mean of the two, and both are printed.
        after = box_limit(model, image, seconds, cores)
    c32, c4 = verity_rows[32], verity_rows[4]
    little, limit = 32 / c32["rps"] * 1000, (before + after) / 2
    return {"cores": cores, "image": "640x480 photo JPEG", "model": str(model.relative_to(ROOT)),
            "limit_images_per_s": limit, "limit_before_after": [before, after], "int8": int8,
            "verity": verity_rows, "naive": naive_rows,
            "share_of_limit_c32": c32["rps"] / limit, "little_mean_ms_c32": little,
            "p99_over_little_c32": c32["p99_ms"] / little, "p99_ms_c4": c4["p99_ms"],
            "verity_over_naive_c32": c32["rps"] / naive_rows[32]["rps"],
            "load_average": load_average()}  # fmt: skip


def summary(f: dict[str, Any]) -> str:
    c32, int8 = f["verity"][32], f["int8"]
    before, after = f.get("limit_before_after", [f["limit_images_per_s"]] * 2)
    return (
        f"verity serve --workers {f['cores']} at c=32: {c32['rps']:.1f} req/s = "
        f"{f['share_of_limit_c32']:.2f} of the box's limit ({f['limit_images_per_s']:.1f} img/s decode + "
        f"engine, no HTTP, the mean of {before:.1f} before and {after:.1f} after the servers; target >= "
        f"{SHARE_TARGET}), {f['verity_over_naive_c32']:.2f}x the naive server ({f['naive'][32]['rps']:.1f} "
        f"req/s); p99 {c32['p99_ms']:.0f} ms = {f['p99_over_little_c32']:.2f}x the Little's-law mean "
        f"{f['little_mean_ms_c32']:.0f} ms (target <= {LITTLE_FACTOR}x); at c=4 p99 {f['p99_ms_c4']:.0f} ms "
        f"(target <= {C4_P99_MS:.0f} ms); load average {f['load_average']:.1f}\n"
        f"the box's limit: fp32 {f['limit_images_per_s']:.1f} img/s, INT8 {int8['limit_images_per_s']:.1f} "
        f"img/s ({int8['limit_images_per_s'] / f['limit_images_per_s']:.2f}x); {int8_status(int8)}"
    )


def int8_status(int8: dict[str, Any]) -> str:
    """Which precision `verity serve` runs for this model, and why."""
    if int8["passed"]:
        return "the shipped INT8 passed its accuracy gate and serves (VERITY_PRECISION=auto)"
    if int8["passed"] is None:
        return "the shipped model has no INT8 gate result, so fp32 serves"
    return f"fp32 serves: the shipped INT8 failed its accuracy gate ({'; '.join(int8['reasons'])})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    args = parser.parse_args()
    figures = run(args.seconds)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
