"""Engine throughput: images/s at batch 1, 8, 32 for PyTorch eager, ORT fp32 and ORT INT8.

The model is the registry's efficientnet_lite0 (photo, 224 px), exported through the real exporter
(parity gate) and quantized with the real static QDQ per-channel path, calibrated on photo-like JPEGs
through the serving preprocessor (random weights: only speed is measured here; the accuracy gate is
exercised in tests/test_quantize.py and by `verity export --int8` on a trained model).

The share of peak FLOP/s uses the model's multiply-add count (Conv and Linear layers, counted with
forward hooks; 2 FLOP per multiply-add) and benchmarks.common.cpu_info's peak estimate. INT8 is
reported against both the fp32 peak and the VNNI int8 peak.

    .venv/bin/python benchmarks/engine_bench.py [--seconds 2]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    cpu_info,
    interleaved,
    load_average,
    newest_shipped,
    photo_jpeg,
    print_run,
    shipped_label,
    time_per_call,
)

BATCH_SIZES = (1, 8, 32)


def model_flops(model: Any, shape: tuple[int, ...]) -> float:
    """FLOPs of one forward pass for one image (2 x multiply-adds of Conv2d and Linear layers)."""
    import torch

    total = [0.0]

    def conv_hook(module: torch.nn.Conv2d, _inputs: Any, output: torch.Tensor) -> None:
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total[0] += 2.0 * kernel * output.numel()

    def linear_hook(module: torch.nn.Linear, _inputs: Any, output: torch.Tensor) -> None:
        total[0] += 2.0 * module.in_features * output.numel()

    handles = []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    with torch.inference_mode():
        model(torch.zeros(1, *shape))
    for handle in handles:
        handle.remove()
    return total[0]


def build_models(workdir: Path, size: int = 224) -> dict[str, Any]:
    """fp32 ONNX (exported with the parity gate), INT8 ONNX (static QDQ), and the torch model."""
    from benchmarks.models import lite0_onnx, lite0_torch
    from verity.inference.preprocess import load_for_model
    from verity.training.quantize import quantize_static_model

    fp32 = lite0_onnx(workdir / "photo" / "0.0.0" / "model.onnx", "photo", size)
    model, spec = lite0_torch("photo", size)  # same architecture; its weights need not match (speed only)
    calibration = np.stack([load_for_model(photo_jpeg(seed=s), spec) for s in range(16)])
    int8 = fp32.with_name("model.int8.onnx")
    quantize_static_model(fp32, int8, calibration)
    return {"fp32": fp32, "int8": int8, "torch": model, "spec": spec}


def ort_sessions(models: dict[str, Any], cores: int) -> dict[tuple[str, str], Any]:
    """(runtime, "all" or "one") -> OnnxEngine for fp32 and INT8: sessions on all cores (spinning, as a
    busy server), and single-thread ones, timed in CPU time: robust to other processes sharing the cores,
    and x cores = what the machine gives when it is not shared (ORT scales near-linearly to 2 threads)."""
    from verity.inference.engine import OnnxEngine

    sessions = {}
    for runtime, path in (("ort_fp32", models["fp32"]), ("ort_int8", models["int8"])):
        sessions[runtime, "all"] = OnnxEngine(
            path, provider="cpu", intra_op_threads=cores, allow_spinning=True
        )
        sessions[runtime, "one"] = OnnxEngine(path, provider="cpu", intra_op_threads=1)
    return sessions


def batch_rows(
    models: dict[str, Any], sessions: dict[tuple[str, str], Any], batch: np.ndarray, info: dict[str, Any],
    flops: float, seconds: float,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per runtime for this batch: throughput on every core, CPU time on one thread, peak shares."""
    import torch

    cores, batch_size = info["cores"], len(batch)
    tensor = torch.from_numpy(batch)
    runners = {
        "torch_eager": lambda: _torch_forward(models["torch"], tensor),
        "ort_fp32": lambda: sessions["ort_fp32", "all"].run(batch),
        "ort_int8": lambda: sessions["ort_int8", "all"].run(batch),
    }
    single_runners = {
        "torch_eager": lambda: _torch_forward(models["torch"], tensor, threads=1),
        "ort_fp32": lambda: sessions["ort_fp32", "one"].run(batch),
        "ort_int8": lambda: sessions["ort_int8", "one"].run(batch),
    }
    rows = []
    for name, runner in runners.items():
        cpu_ms = time_per_call(single_runners[name], seconds / 2)["cpu_median_ms"]
        torch.set_num_threads(cores)
        timing = time_per_call(runner, seconds)
        images_per_s = batch_size / (timing["median_ms"] / 1000)
        peak = info["peak_int8_gops"] * 1e9 if name == "ort_int8" else info["peak_fp32_gflops"] * 1e9
        rows.append(
            {
                "runtime": name,
                "batch": batch_size,
                "images_per_s": images_per_s,
                "ms_per_batch": timing["median_ms"],
                "gflops_per_s": images_per_s * flops / 1e9,
                "share_of_peak": images_per_s * flops / peak,
                "share_of_fp32_peak": images_per_s * flops / (info["peak_fp32_gflops"] * 1e9),
                "cpu_ms_per_image_1thread": cpu_ms / batch_size,
                "images_per_s_unshared_estimate": cores * batch_size / (cpu_ms / 1000),
            }
        )
    return rows


def run(workdir: Path, seconds: float = 2.0, size: int = 224) -> dict[str, Any]:
    import torch

    info = cpu_info()
    models = build_models(workdir, size)
    spec = models["spec"]
    shape = (spec.in_chans, spec.image_size, spec.image_size)
    flops = model_flops(models["torch"], shape)
    torch.set_num_threads(info["cores"])
    sessions = ort_sessions(models, info["cores"])
    rng = np.random.default_rng(0)
    rows = []
    for batch_size in BATCH_SIZES:
        batch = rng.random((batch_size, *shape), dtype=np.float32)
        rows += batch_rows(models, sessions, batch, info, flops, seconds)
    by = {(r["runtime"], r["batch"]): r["images_per_s"] for r in rows}
    cpu = {(r["runtime"], r["batch"]): r["cpu_ms_per_image_1thread"] for r in rows}
    return {
        "model": f"efficientnet_lite0 photo {size}px",
        "gflops_per_image": flops / 1e9,
        "cpu": info,
        "threads": info["cores"],
        "rows": rows,
        "int8_speedup_batch8": by[("ort_int8", 8)] / by[("ort_fp32", 8)],
        "ort_vs_torch_batch8": by[("ort_fp32", 8)] / by[("torch_eager", 8)],
        "int8_speedup_batch8_cpu_time": cpu[("ort_fp32", 8)] / cpu[("ort_int8", 8)],
        # What micro-batching can gain in compute on this CPU: per-image cost at batch 1 over batch 8.
        "batch8_gain_cpu_time": {k: cpu[(k, 1)] / cpu[(k, 8)] for k in ("ort_fp32", "ort_int8")},
        "target_int8_speedup": 2.0,
        "shipped_default": shipped_default(),
        "load_average": load_average(),
    }


def shipped_default(seconds: float = 4.0, batch_size: int = 8) -> dict[str, Any] | None:
    """INT8 / fp32 of the shipped default photo model (what `make serve` serves), batch 8, timed in
    turns: 2-thread wall time, and CPU time of 1-thread sessions. None when no INT8 variant is shipped."""
    from verity.inference.engine import OnnxEngine, usable_cores

    fp32_path = newest_shipped("photo-default")
    if fp32_path is None or not fp32_path.with_name("model.int8.onnx").is_file():
        return None
    cores = usable_cores()
    engines = {
        (precision, threads): OnnxEngine(
            fp32_path, provider="cpu", precision=precision, intra_op_threads=threads
        )
        for precision in ("fp32", "int8")
        for threads in (1, cores)
    }
    batch = np.random.default_rng(0).random((batch_size, *engines["fp32", 1].input_shape()), dtype=np.float32)
    timings = interleaved(
        {f"{p}/{t}": (lambda e=engine: e.run(batch)) for (p, t), engine in engines.items()}, seconds
    )
    wall = {p: timings[f"{p}/{cores}"]["median_ms"] for p in ("fp32", "int8")}
    cpu = {p: timings[f"{p}/1"]["process_cpu_median_ms"] for p in ("fp32", "int8")}
    return {
        "model": shipped_label(fp32_path),
        "input_shape": list(engines["fp32", 1].input_shape()),
        "batch": batch_size,
        "images_per_s": {p: batch_size / (ms / 1000) for p, ms in wall.items()},
        "int8_speedup_wall": wall["fp32"] / wall["int8"],
        "int8_speedup_cpu_time": cpu["fp32"] / cpu["int8"],
    }


def _torch_forward(model: Any, tensor: Any, threads: int | None = None) -> Any:
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    with torch.inference_mode():
        return model(tensor)


if __name__ == "__main__":
    print_run(run, __doc__.splitlines()[0], seconds=2.0)
