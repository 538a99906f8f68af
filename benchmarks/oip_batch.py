"""An Open Inference Protocol request with 8 images against /v1/predict/batch with the same 8: median
wall time of each on one server (the shipped photo model), requests alternating, and their ratio.

Both score the items of one request concurrently, so the model batcher gathers them into one batch. The
/v2 request is sent two ways: the images as base64 BYTES in JSON (as KServe's examples do), which costs
the encoding, and as raw bytes through the binary tensor data extension (as Triton's client sends them:
each element a 4-byte little-endian length and its bytes, after the JSON header), against a multipart
form. The target is at most 1.3x.

    .venv/bin/python benchmarks/oip_batch.py [--rounds 20]
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import struct
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

    workdir.mkdir(parents=True, exist_ok=True)
    images = [photo_jpeg(640, 480, seed=seed) for seed in range(ITEMS)]
    files = [("files", (f"{i}.jpg", image, "image/jpeg")) for i, image in enumerate(images)]
    oip = {"inputs": [{"name": "image_bytes", "shape": [ITEMS], "datatype": "BYTES",
                       "data": [base64.b64encode(image).decode() for image in images]}]}  # fmt: skip
    raw = b"".join(struct.pack("<I", len(image)) + image for image in images)
    header = json.dumps({"inputs": [{"name": "image_bytes", "shape": [ITEMS], "datatype": "BYTES",
                                     "parameters": {"binary_data_size": len(raw)}}]}).encode()  # fmt: skip
    binary_headers = {"Inference-Header-Content-Length": str(len(header)),
                      "Content-Type": "application/octet-stream"}  # fmt: skip
    times: dict[str, list[float]] = {"v1_batch": [], "v2_infer": [], "v2_binary": []}
    serving = Server(models, workdir, {"VERITY_MAX_BATCH_FILES": str(ITEMS)})
    with serving as server, httpx.Client(timeout=60) as client:

        def send(kind: str, keep: bool) -> None:
            started = time.perf_counter()
            if kind == "v1_batch":
                form = {"data": {"modality": "photo"}, "files": files}
                response = client.post(server.url + "/v1/predict/batch", **form)
            elif kind == "v2_infer":
                response = client.post(server.url + "/v2/models/photo/infer", json=oip)
            else:
                response = client.post(server.url + "/v2/models/photo/infer", content=header + raw,
                                       headers=binary_headers)  # fmt: skip
            response.raise_for_status()
            if keep:
                times[kind].append((time.perf_counter() - started) * 1000)

        for kind in times:  # warm-up
            send(kind, keep=False)
        kinds = list(times)
        for number in range(rounds):  # each round in another order, so drift slows all alike
            for kind in kinds[number % 3 :] + kinds[: number % 3]:
                send(kind, keep=True)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    batch = medians["v1_batch"]
    return {"items": ITEMS, "rounds": rounds, "median_ms": medians, "ratio": medians["v2_infer"] / batch,
            "binary_ratio": medians["v2_binary"] / batch, "load_average": load_average()}  # fmt: skip


def summary(figures: dict[str, Any]) -> str:
    medians = figures["median_ms"]
    return (f"OIP batch: {figures['items']} images in one /v2 infer {medians['v2_infer']:.0f} ms (base64 "
            f"JSON, {figures['ratio']:.2f}x) and {medians['v2_binary']:.0f} ms (binary extension, "
            f"{figures['binary_ratio']:.2f}x) against /v1/predict/batch {medians['v1_batch']:.0f} ms "
            f"(target <= {TARGET}x; load average {figures['load_average']:.1f})")  # fmt: skip


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
