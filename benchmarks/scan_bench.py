"""A 4000x1500 16-bit X-ray scan: verdict plus tile heatmap, end to end (target <= 1 s on 2 cores).

Times decode of the 16-bit PNG, tiling (60 tiles of 448 px at scale 0.5, 25% overlap), batched
inference with CAMs, aggregation, evidence assembly and the PNG overlay, for the registry's
efficientnet_lite0 X-ray model (1 channel, 224 px) in fp32 and INT8.

    .venv/bin/python benchmarks/scan_bench.py [--seconds 3]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    cpu_info,
    load_average,
    newest_shipped,
    png_bytes,
    print_run,
    shipped_label,
    time_per_call,
    xray_scan,
)

TARGET_S = 1.0


def build_models(workdir: Path, scan: np.ndarray) -> dict[str, Path]:
    from benchmarks.models import lite0_onnx
    from verity.inference.preprocess import to_model_input
    from verity.inference.spec import resolve_spec
    from verity.training.quantize import quantize_static_model

    fp32 = lite0_onnx(workdir / "xray" / "0.0.0" / "model.onnx", "xray", 224)
    spec = resolve_spec("xray")
    # Calibration on tiles of the scan, through the same preprocessing the tiler uses.
    tiles = [
        scan[top : top + 448, left : left + 448, None]
        for top in (0, 500, 1000)
        for left in range(0, 3500, 700)
    ]
    calibration = np.stack([to_model_input(tile, spec) for tile in tiles])
    int8 = fp32.with_name("model.int8.onnx")
    quantize_static_model(fp32, int8, calibration)
    return {"fp32": fp32, "int8": int8}


def run(workdir: Path, seconds: float = 3.0) -> dict[str, Any]:
    from verity.inference.decode import decode_image
    from verity.inference.decode_limits import DEFAULT_LIMITS
    from verity.inference.engine import OnnxEngine
    from verity.inference.tiling import score_scan

    info = cpu_info()
    scan = xray_scan()
    data = png_bytes(scan)
    models: dict[str, tuple[Path, str]] = {
        precision: (path, precision) for precision, path in build_models(workdir, scan).items()
    }
    shipped = newest_shipped("xray-default")
    if shipped is not None:  # what `make serve` answers a scan with: its own tile size and served precision
        models[f"shipped {shipped_label(shipped)}"] = (shipped, "auto")
    rows = []
    for label, (path, precision) in models.items():
        # As the server runs it: one intra-op thread per session, one tile batch per core at a time.
        engine = OnnxEngine(path, provider="cpu", intra_op_threads=1, precision=precision)
        last: dict[str, Any] = {}

        def once(engine: OnnxEngine = engine, last: dict[str, Any] = last) -> None:
            image = decode_image(data, DEFAULT_LIMITS)
            result = score_scan(image, engine)
            last["png"] = result.heatmap_png(image)
            last["result"] = result

        timing = time_per_call(once, seconds, min_calls=3)
        result = last["result"]
        rows.append(
            {
                "precision": label if precision != "auto" else f"{label} ({engine.precision})",
                "seconds": timing["median_ms"] / 1000,
                # CPU-seconds of all threads: / cores = the wall time on an unshared machine at best.
                "cpu_seconds": timing["process_cpu_median_ms"] / 1000,
                "tiles": len(result.tiles),
                "grid": list(result.grid),
                "verdict": result.verdict,
                "heatmap_png_bytes": len(last["png"]),
                "heatmap_size": list(result.evidence.shape[::-1]),
            }
        )
    return {
        "scan": "4000x1500 16-bit PNG",
        "png_bytes": len(data),
        "threads": info["cores"],
        "rows": rows,
        "target_s": TARGET_S,
        "meets_target": {row["precision"]: row["seconds"] <= TARGET_S for row in rows},
        "load_average": load_average(),
    }


if __name__ == "__main__":
    print_run(run, __doc__.splitlines()[0], seconds=3.0)
