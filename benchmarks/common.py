"""Shared pieces of the benchmarks: CPU facts and peak FLOP/s, realistic test images, timing."""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# FMA units per core for AVX-512: 2 on Xeon Gold/Platinum (Skylake-SP and later server parts), 1 on some
# Silver/Bronze parts. A virtual machine does not expose it, so it is an assumption, overridable here.
FMA_UNITS = int(os.environ.get("VERITY_BENCH_FMA_UNITS", "2"))


def cpu_info() -> dict[str, Any]:
    """Model, cores usable by this process, clock (GHz), SIMD width, and the peak FLOP/s estimates.

    fp32 peak = cores x FMA units x lanes (16 for AVX-512, 8 for AVX2) x 2 (multiply+add) x clock.
    int8 peak (VNNI): each 32-bit lane does 4 int8 multiply-adds per FMA slot, i.e. 4x the fp32 figure.
    The clock is the nominal one from the model name (turbo and AVX-512 down-clocking cancel roughly).
    """
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next(
        (line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), ""
    )
    flags = set(
        next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    )
    match = re.search(r"@\s*([\d.]+)\s*GHz", model)
    mhz = [float(line.split(":")[1]) for line in text.splitlines() if line.startswith("cpu MHz")]
    ghz = float(match.group(1)) if match else (mhz[0] / 1000.0 if mhz else 2.0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    peak_fp32 = cores * FMA_UNITS * lanes * 2 * ghz * 1e9
    vnni = "avx512_vnni" in flags or "avx_vnni" in flags
    return {
        "model": model or platform.processor(),
        "cores": cores,
        "ghz": ghz,
        "simd": "avx512" if lanes == 16 else "avx2" if lanes == 8 else "sse",
        "fma_units_assumed": FMA_UNITS,
        "vnni": vnni,
        "amx": "amx_tile" in flags,
        "peak_fp32_gflops": peak_fp32 / 1e9,
        "peak_int8_gops": peak_fp32 * (4 if vnni else 2) / 1e9,
    }


def int8_gate(card_path: Path) -> dict[str, Any]:
    """A model's INT8 gate as its card.json records it: "model", "passed" (None: never run) and "reasons"
    (why model.int8.onnx does not serve)."""
    card = json.loads(card_path.read_text(encoding="utf-8"))
    gate = card.get("int8") or {}
    return {"model": f"{card['name']}/{card['version']}", "passed": gate.get("passed"),
            "reasons": gate.get("reasons") or []}  # fmt: skip


def photo_jpeg(width: int = 1024, height: int = 768, seed: int = 0, quality: int = 90) -> bytes:
    """A photo-like JPEG: smooth lighting, objects with edges, printed text, blur and sensor noise.

    Random noise alone is the worst case for JPEG (no zero coefficients) and not what cameras send;
    this image has the mix of flat regions, edges and fine texture of a product photo.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 140 + 70 * np.sin(x / width * 2.5 + 0.3) * np.cos(y / height * 1.7)
    base = np.stack([light * 1.0, light * 0.92, light * 0.8], axis=2)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(14):
        x0, y0 = int(rng.integers(0, width - 100)), int(rng.integers(0, height - 100))
        x1, y1 = x0 + int(rng.integers(60, 400)), y0 + int(rng.integers(60, 300))
        colour = tuple(int(c) for c in rng.integers(20, 235, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
    for row in range(12):
        draw.text((40, 40 + row * 50), "VERITY GENUINE ARTICLE 0123456789 " * 3, fill=(15, 15, 15))
    image = image.filter(ImageFilter.GaussianBlur(1.2))
    noisy = np.asarray(image, np.float32) + rng.normal(0, 4, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def xray_scan(width: int = 4000, height: int = 1500, seed: int = 0) -> np.ndarray:
    """A 16-bit transmission-like scan: bright air, a conveyor band, overlapping absorbing objects."""
    rng = np.random.default_rng(seed)
    attenuation = np.zeros((height, width), np.float32)
    attenuation[int(height * 0.85) :, :] += 0.4  # belt
    y, x = np.mgrid[0:height, 0:width]
    for _ in range(40):
        cy, cx = rng.integers(100, height - 100), rng.integers(100, width - 100)
        ry, rx = rng.integers(30, 300), rng.integers(30, 500)
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1
        attenuation[inside] += rng.uniform(0.2, 1.5)
    transmitted = np.exp(-attenuation) * 60000 + rng.normal(0, 300, attenuation.shape)
    return np.clip(transmitted, 0, 65535).astype(np.uint16)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def time_per_call(
    function: Callable[[], Any], min_seconds: float = 1.0, min_calls: int = 5
) -> dict[str, float]:
    """Calls `function` repeatedly (after one warm-up call) for at least min_seconds.

    Reports wall time and this thread's CPU time per call: on a shared machine (other processes on the
    same 2 cores) wall time includes waiting for a core, CPU time is what the call itself costs.
    """
    function()
    walls, cpus, process = [], [], []
    started = time.perf_counter()
    while len(walls) < min_calls or time.perf_counter() - started < min_seconds:
        t0, c0, p0 = time.perf_counter(), time.thread_time(), time.process_time()
        function()
        cpus.append(time.thread_time() - c0)
        process.append(time.process_time() - p0)
        walls.append(time.perf_counter() - t0)
    return {
        "median_ms": statistics.median(walls) * 1000,
        "mean_ms": statistics.fmean(walls) * 1000,
        "p90_ms": float(np.percentile(walls, 90)) * 1000,
        "cpu_median_ms": statistics.median(cpus) * 1000,
        "process_cpu_median_ms": statistics.median(process) * 1000,  # all threads of this process
        "calls": len(walls),
    }


def newest_shipped(name: str) -> Path | None:
    """checkpoints/<name>/<newest version>/model.onnx: the version `make serve` serves by default
    (versions in the registry's natural order, so 1.10.0 is newer than 1.9.0)."""
    from verity.inference.artifacts import version_sort_key

    files = (REPO / "checkpoints" / name).glob("*/model.onnx")
    return max(files, key=lambda path: version_sort_key(path.parent.name), default=None)


def shipped_label(model: Path) -> str:
    """'<name> <version>' of a checkpoints/<name>/<version>/model.onnx path."""
    return f"{model.parent.parent.name} {model.parent.name}"


def interleaved(
    functions: dict[str, Callable[[], Any]], min_seconds: float = 2.0
) -> dict[str, dict[str, float]]:
    """Times several functions in turn, round after round, so a slow phase of a shared host (these
    VMs drift by 1.5x within a minute) falls on all of them alike: their ratios stay fair."""
    for function in functions.values():
        function()
    walls: dict[str, list[float]] = {name: [] for name in functions}
    cpus: dict[str, list[float]] = {name: [] for name in functions}
    started = time.perf_counter()
    while time.perf_counter() - started < min_seconds or len(next(iter(walls.values()))) < 5:
        for name, function in functions.items():
            t0, c0 = time.perf_counter(), time.process_time()
            function()
            cpus[name].append(time.process_time() - c0)
            walls[name].append(time.perf_counter() - t0)
    return {
        name: {
            "median_ms": statistics.median(walls[name]) * 1000,
            "process_cpu_median_ms": statistics.median(cpus[name]) * 1000,
            "calls": len(walls[name]),
        }
        for name in functions
    }


def load_average() -> float:
    """1-minute load average: above the core count, other work competed with the measurement."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def print_run(run: Callable[[Path, float], Any], description: str, seconds: float) -> None:
    """A benchmark part's command line: `--seconds`, a scratch folder, the figures printed as JSON."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seconds", type=float, default=seconds)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        print(json.dumps(run(Path(work), args.seconds), indent=2))
