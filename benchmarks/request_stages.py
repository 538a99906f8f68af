"""What one POST /v1/predict costs, stage by stage, in process: where the server's time goes besides the
model, and what each stage is worth against the model's own.

One real request through the app (TestClient) gives the bodies every stage works on: the multipart body
of a 1024x768 photo JPEG, its JSON answer and its audit record. Then each stage runs alone, the stages
in turns so that a noisy machine slows all of them alike, and the median wall time of each is printed:

- `multipart parse`: Starlette's form parser (python-multipart) reading the body into an UploadFile,
  and the file read back; `raw body`: the same image sent as the whole body (Content-Type: image/*);
- `sha256`: the upload's hash (audit record and image store);
- `decode + preprocess`: the one tiling rule's decode to the model input (`pipeline.prepare`);
- `model`: the engine's predict for one image (with its heatmap), for scale;
- `open-set gate`: `pipeline.judge` (the embedding's kNN, the input profile, the verdict rule);
- `answer model + JSON`: the answer validated by its pydantic model and written as JSON;
- `audit write`: one record into the SQLite audit log (WAL, synchronous=normal), committed;
- `image store`: the upload written content-addressed (a new file each time).

    .venv/bin/python benchmarks/request_stages.py [--rounds 200]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import load_average, photo_jpeg  # noqa: E402
from verity.api.audit import SQLiteAuditStore  # noqa: E402
from verity.api.image_store import ImageStore  # noqa: E402
from verity.api.schemas import PredictionResult  # noqa: E402
from verity.inference.artifacts import resolve_model  # noqa: E402
from verity.inference.engine import OnnxEngine  # noqa: E402
from verity.inference.pipeline import judge, prepare  # noqa: E402
from verity.inference.tiling import TilingOptions  # noqa: E402

BOUNDARY = "verity-bench-boundary"
# What the server adds to a request with its default settings (VERITY_STORE_IMAGES off: no image store).
SERVER_STAGES = ("multipart parse", "sha256", "answer model + JSON", "audit write")


def multipart_body(image: bytes) -> bytes:
    parts = [
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="modality"\r\n\r\nphoto\r\n'.encode(),
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="label.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n".encode() + image + b"\r\n",
        f"--{BOUNDARY}--\r\n".encode(),
    ]
    return b"".join(parts)


def _request(body: bytes, content_type: str):  # noqa: ANN202 - a starlette Request
    from starlette.requests import Request

    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    headers = [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode())]
    return Request({"type": "http", "method": "POST", "path": "/v1/predict", "headers": headers}, receive)


async def parse_form(body: bytes) -> bytes:
    form = await _request(body, f"multipart/form-data; boundary={BOUNDARY}").form()
    upload = form["file"]
    data = await upload.read()  # type: ignore[union-attr]
    await form.close()
    return data


async def read_raw(body: bytes) -> bytes:
    return await _request(body, "image/jpeg").body()


def served_once(models: Path, image: bytes, work: Path) -> tuple[dict[str, Any], Any]:
    """One real request through the app: its JSON answer and its audit record."""
    from fastapi.testclient import TestClient

    from verity.api.app import create_app
    from verity.api.settings import Settings

    settings = Settings(models_dir=models, audit_db=work / "audit.sqlite", keys_file=work / "keys.json",
                        background_load=False, allowed_hosts=["testserver"], rate_limit_per_s=0,
                        references_dir=work / "references")  # fmt: skip
    form = {"files": {"file": ("label.jpg", image)}, "data": {"modality": "photo"}}
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/predict", **form)
        response.raise_for_status()
    body = response.json()
    store = SQLiteAuditStore(work / "audit.sqlite")
    record = store.get(body["request_id"])
    store.close()
    return body, record


def measure(models: Path, rounds: int) -> dict[str, Any]:
    image = photo_jpeg(1024, 768, seed=3)
    body = multipart_body(image)
    engine = OnnxEngine(resolve_model(models / "photo-default"), warmup=True)
    tiling = TilingOptions()
    upload = prepare(image, engine.spec, tiling)
    output = engine.predict([upload.decoded.model_input], with_cam=True)[0]
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        answer, record = served_once(models, image, work)
        audit = SQLiteAuditStore(work / "bench-audit.sqlite")
        images = ImageStore(work / "images")
        loop = asyncio.new_event_loop()  # one loop, as the server's: its start is no stage's cost
        stages: dict[str, Callable[[], object]] = {
            "multipart parse": lambda: loop.run_until_complete(parse_form(body)),
            "raw body": lambda: loop.run_until_complete(read_raw(image)),
            "sha256": lambda: hashlib.sha256(image).hexdigest(),
            "decode + preprocess": lambda: prepare(image, engine.spec, tiling),
            "model": lambda: engine.predict([upload.decoded.model_input], with_cam=True),
            "open-set gate": lambda: judge(prepare(image, engine.spec, tiling), output, engine),
            "answer model + JSON": lambda: PredictionResult.model_validate(answer).model_dump_json(),
            "audit write": lambda: audit.record([replace(record, request_id=uuid.uuid4().hex)]),
            "image store": lambda: images.put(image, uuid.uuid4().hex * 2, "jpeg"),
        }
        times: dict[str, list[float]] = {name: [] for name in stages}
        for _ in range(rounds):
            for name, stage in stages.items():
                started = time.perf_counter()
                stage()
                times[name].append((time.perf_counter() - started) * 1000)
        audit.close()
        loop.close()
    medians = {name: statistics.median(values) for name, values in times.items()}
    # The gate's own cost: judge re-decodes above (its profile is computed once per decode), so the
    # decode's median is taken off.
    medians["open-set gate"] = max(0.0, medians["open-set gate"] - medians["decode + preprocess"])
    server = sum(medians[name] for name in SERVER_STAGES)
    return {
        "image": "1024x768 photo JPEG",
        "body_bytes": len(body),
        "rounds": rounds,
        "median_ms": {name: round(value, 3) for name, value in medians.items()},
        "server_stages_ms": round(server, 3),
        "server_share_of_model": round(server / medians["model"], 3),
        "load_average": load_average(),
    }


def summary(figures: dict[str, Any]) -> str:
    """The lines `make bench` prints: each stage's median, and the server's own share."""
    stages = ", ".join(f"{name} {ms:.2f} ms" for name, ms in figures["median_ms"].items())
    own, share, load = figures["server_stages_ms"], figures["server_share_of_model"], figures["load_average"]
    return (
        f"Per-request stages ({figures['image']}, median of {figures['rounds']}, in process): {stages}. "
        f"The server's own stages ({', '.join(SERVER_STAGES)}) take {own:.2f} ms, {share:.0%} of the "
        f"model's time (load average {load:.1f})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, default=ROOT / "checkpoints")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    figures = measure(args.models, args.rounds)
    print(json.dumps(figures, indent=2))
    print(summary(figures))


if __name__ == "__main__":
    main()
