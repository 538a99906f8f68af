"""Decode + preprocess cost of a 1024x768 photo JPEG on one core (target <= 3.5 ms).

Measures `inference.decode.load_for_model` (the one path evaluation and the server use: JPEG draft
decoding at reduced scale, resize, [0, 1] scaling) against the naive full-resolution decode, on a
photo-like JPEG (see benchmarks.common.photo_jpeg), in this single thread.

    .venv/bin/python benchmarks/decode_bench.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import load_average, photo_jpeg, time_per_call  # noqa: E402
from inference.decode import DEFAULT_LIMITS, decode_image, load_for_model, to_model_input  # noqa: E402
from inference.spec import default_spec  # noqa: E402

TARGET_MS = 3.5


def run(seconds: float = 2.0) -> dict[str, Any]:
    """Per-image cost in ms (median) of the serving path and of a naive full decode."""
    import os

    spec = default_spec("photo")
    data = photo_jpeg()
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        if cores:
            os.sched_setaffinity(0, {min(cores)})  # one core, as the target says
        serving = time_per_call(lambda: load_for_model(data, spec), seconds)
        naive = time_per_call(
            lambda: to_model_input(decode_image(data, DEFAULT_LIMITS, draft_size=None), spec), seconds
        )
    finally:
        if cores:
            os.sched_setaffinity(0, cores)  # the other benchmarks (and their subprocesses) need every core
    return {
        "image": "1024x768 photo-like JPEG q90",
        "jpeg_bytes": len(data),
        "load_for_model_cpu_ms": serving["cpu_median_ms"],
        "load_for_model_wall_ms": serving["median_ms"],
        "naive_full_decode_cpu_ms": naive["cpu_median_ms"],
        "decoded_shape": list(decode_image(data, DEFAULT_LIMITS, draft_size=spec.image_size).shape),
        "target_ms": TARGET_MS,
        "meets_target": serving["cpu_median_ms"] <= TARGET_MS,
        "load_average": load_average(),
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
