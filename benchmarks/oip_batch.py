"""An Open Inference Protocol request with 8 images against /v1/predict/batch with the same 8: median
wall time of each on one server (the shipped photo model), requests alternating, and their ratio.

Both score the items of one request concurrently, so the model batcher gathers them into one batch; the
/v2 request carries the images as base64 BYTES in JSON (as KServe's examples do), which costs the
encoding, against a multipart form. The target is at most 1.3x.

    .venv/bin/python benchmarks/oip_batch.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import base64
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

ITEMS = 8
TARGET = 1.3


def run(workdir: Path, rounds: int = 20, models: Path = ROOT / "checkpoints") -> dict[str, Any]:
    import httpx

    images = [photo_jpeg(640, 480, seed=seed) for seed in range(ITEMS)]
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    oip = {"inputs": [{"name": "image_bytes", "shape": [ITEMS], "datatype": "BYTES",
                       "data": [base64.b64encode(image).decode() for image in images]}]}  # fmt: skip
    times: dict[str, list[float]] = {"v1_batch": [], "v2_infer": []}
    serving = Server(models, workdir, {"VERITY_MAX_BATCH_FILES": str(ITEMS)})
    with serving as server, httpx.Client(timeout=60) as client:

        def send(kind: str, keep: bool) -> None:
            started = time.perf_counter()
            if kind == "v1_batch":
                form = {"data": {"modality": "photo"}, "files": files}
                response = client.post(server.url + "/v1/predict/batch", **form)
            else:
                response = client.post(server.url + "/v2/models/photo/infer", json=oip)
            response.raise_for_status()
            if keep:
                times[kind].append((time.perf_counter() - started) * 1000)

        for kind in times:  # warm-up
            send(kind, keep=False)
        for number in range(rounds):
            for kind in ("v1_batch", "v2_infer") if number % 2 == 0 else ("v2_infer", "v1_batch"):
                send(kind, keep=True)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    return {"items": ITEMS, "rounds": rounds, "median_ms": medians,
            "ratio": medians["v2_infer"] / medians["v1_batch"], "load_average": load_average()}  # fmt: skip


def summary(figures: dict[str, Any]) -> str:
    medians = figures["median_ms"]
    return (f"OIP batch: {figures['items']} images in one /v2 infer {medians['v2_infer']:.0f} ms against "
            f"/v1/predict/batch {medians['v1_batch']:.0f} ms ({figures['ratio']:.2f}x; target <= {TARGET}x; "
            f"load average {figures['load_average']:.1f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        figures = run(Path(work), args.rounds)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
