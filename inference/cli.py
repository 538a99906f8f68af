"""`verity predict`: verdicts for image files from the command line, with the server's own code path.

    verity predict --model checkpoints/photo-default IMAGE... [--heatmap out.png] [--json]

`--model` takes a model.onnx, a version folder holding one, a model folder (its newest version, in the
natural version order the server uses: `inference.artifacts`) or a folder holding one model.
Whole images go through exactly the server's preprocessing (decode with JPEG draft, `to_model_input`).
X-ray scans larger than one tile are tiled (`inference.tiling`; `--tiles on|off` to force). No torch:
this runs on a scanner console with the base install.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from verity.inference.artifacts import ONNX_FILES, resolve_model
from verity.inference.decode import DEFAULT_LIMITS, DecodeError, decode_image, read_image_bytes
from verity.inference.engine import PRECISIONS, OnnxEngine
from verity.inference.heatmap import heatmap_png
from verity.inference.preprocess import load_for_model
from verity.inference.tiling import AGGREGATES, score_scan, tile_size


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verity predict", description="Give a verdict for image files.")
    parser.add_argument(
        "images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, TIFF, DICOM, ...)"
    )
    parser.add_argument(
        "--model", required=True, help="model.onnx, its version folder, or a model folder (newest version)"
    )
    parser.add_argument("--heatmap", metavar="PNG", help="write the evidence overlay here (one per image)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per image")
    parser.add_argument("--provider", help="force an execution provider: cpu, cuda or tensorrt")
    parser.add_argument(
        "--precision", default="auto", choices=PRECISIONS, help="model variant (default auto)"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (default 1)")
    parser.add_argument(
        "--tiles",
        default="auto",
        choices=["auto", "on", "off"],
        help="tile images larger than one tile: auto = X-ray scans only",
    )
    parser.add_argument("--scale", type=float, default=0.5, help="tile scale (0.5: tiles of 2x the input)")
    parser.add_argument("--aggregate", default="max", choices=AGGREGATES, help="scan score from tile scores")
    parser.add_argument("--max-tiles", type=int, default=128)
    return parser


def _heatmap_path(base: str, image: Path, several: bool) -> Path:
    out = Path(base)
    return out.with_name(f"{out.stem}-{image.stem}{out.suffix or '.png'}") if several else out


def predict_file(
    engine: OnnxEngine, image: Path, args: argparse.Namespace
) -> tuple[dict[str, Any], bytes | None]:
    """The result for one file (and its heatmap PNG when asked for)."""
    data = read_image_bytes(image, DEFAULT_LIMITS)
    spec = engine.spec
    wants_tiles = args.tiles == "on" or (args.tiles == "auto" and spec.modality == "xray")
    if wants_tiles:
        # Tiles need full resolution: no reduced-scale JPEG decoding here.
        decoded = decode_image(data, DEFAULT_LIMITS)
        if max(decoded.shape[:2]) > tile_size(spec.image_size, args.scale):
            scan = score_scan(
                decoded, engine, scale=args.scale, aggregate=args.aggregate, max_tiles=args.max_tiles
            )
            result = {
                "score": scan.score,
                "verdict": scan.verdict,
                "tiles": len(scan.tiles),
                "grid": list(scan.grid),
                "aggregate": scan.aggregate,
            }
            return result, scan.heatmap_png(decoded) if args.heatmap else None
    model_input = load_for_model(data, spec, DEFAULT_LIMITS)
    prediction = engine.predict([model_input], with_cam=bool(args.heatmap))[0]
    png = heatmap_png(prediction.cam, model_input) if args.heatmap and prediction.cam is not None else None
    return {"score": prediction.score, "verdict": prediction.verdict, "tiles": 1}, png


def main(argv: list[str] | None = None) -> int:
    """Prints a verdict per image; returns 0, or 1 when any image could not be read."""
    args = build_parser().parse_args(argv)
    engine = OnnxEngine(
        resolve_model(args.model, ONNX_FILES),
        provider=args.provider,
        intra_op_threads=args.threads,
        warmup=False,
        precision=args.precision,
    )
    failures = 0
    several = len(args.images) > 1
    for name in args.images:
        image = Path(name)
        try:
            result, png = predict_file(engine, image, args)
        except (DecodeError, OSError, ValueError) as error:
            failures += 1
            print(f"verity predict: {image}: {error}", file=sys.stderr)
            continue
        result = {
            "image": str(image),
            **result,
            "alarm": engine.thresholds.alarm,
            "clear": engine.thresholds.clear,
            "model": {"name": engine.name, "version": engine.version, "precision": engine.precision},
        }
        if png is not None:
            out = _heatmap_path(args.heatmap, image, several)
            out.write_bytes(png)
            result["heatmap"] = str(out)
        if args.json:
            print(json.dumps(result))
        else:
            tiled = f", {result['tiles']} tiles ({args.aggregate})" if result["tiles"] > 1 else ""
            alarm, clear = engine.thresholds.alarm, engine.thresholds.clear
            print(
                f"{image}: {result['verdict']} (score {result['score']:.3f}; counterfeit >= {alarm:g}, "
                f"genuine <= {clear:g}{tiled}) [{engine.name} {engine.version}]"
                + (f" heatmap {result['heatmap']}" if "heatmap" in result else "")
            )
    return 1 if failures else 0
