"""GPU check (run where onnxruntime has CUDA/TensorRT): providers, fp16 variant, IO binding, speed.

For each available GPU provider (CUDA with fp32 and the fp16 file, TensorRT with its fp16 engine) it
loads efficientnet_lite0 through OnnxEngine, checks the scores against the CPU fp32 engine (max |delta
score|) and measures images/s at batch 1, 8 and 32. Without a GPU provider it says so and returns
{"skipped": reason}; the provider selection itself is unit-tested with mocked availability
(tests/test_engine.py).

    .venv/bin/python benchmarks/gpu_bench.py [--seconds 2]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import print_run, time_per_call  # noqa: E402

BATCH_SIZES = (1, 8, 32)


def run(workdir: Path, seconds: float = 2.0) -> dict[str, Any]:
    from verity.inference.engine import GPU_PROVIDERS, OnnxEngine, available_providers

    gpus = [p for p in GPU_PROVIDERS if p in available_providers()]
    if not gpus:
        return {"skipped": f"no GPU provider in onnxruntime here ({', '.join(available_providers())})"}
    from benchmarks.models import lite0_onnx
    from verity.training.quantize import export_fp16

    fp32 = lite0_onnx(workdir / "photo" / "0.0.0" / "model.onnx")
    export_fp16(fp32)
    reference = OnnxEngine(fp32, provider="cpu")
    rng = np.random.default_rng(0)
    check = rng.random((8, *reference.input_shape()), dtype=np.float32)
    expected = np.array([p.score for p in reference.predict(check)])
    setups = []
    if "CUDAExecutionProvider" in gpus:
        setups += [("cuda", "fp32"), ("cuda", "fp16")]
    if "TensorrtExecutionProvider" in gpus:
        setups += [("tensorrt", "fp16")]
    rows = []
    for provider, precision in setups:
        engine = OnnxEngine(fp32, provider=provider, precision=precision, cache_dir=workdir / "trt-cache")
        scores = np.array([p.score for p in engine.predict(check)])
        row: dict[str, Any] = {
            "provider": engine.providers[0],
            "precision": engine.precision,
            "io_binding": engine.io_binding,
            "max_abs_score_diff_vs_cpu": float(np.abs(scores - expected).max()),
        }
        for batch_size in BATCH_SIZES:
            batch = rng.random((batch_size, *engine.input_shape()), dtype=np.float32)
            timing = time_per_call(lambda b=batch, e=engine: e.run(b), seconds)
            row[f"images_per_s_batch{batch_size}"] = batch_size / (timing["median_ms"] / 1000)
        rows.append(row)
    return {"model": "efficientnet_lite0 photo 224px", "rows": rows}


if __name__ == "__main__":
    print_run(run, __doc__.splitlines()[0], seconds=2.0)
