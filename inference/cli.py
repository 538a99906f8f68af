"""`verity predict`: verdicts for image files from the command line, with the server's own code path.

    verity predict --model checkpoints/photo-default IMAGE... [--heatmap out.png] [--json]

`--model` takes a model.onnx, a version folder holding one, a model folder (its newest version, in the
natural version order the server uses: `inference.artifacts`) or a folder holding one model.
Every image goes through the server's own path: `inference.tiling.load_for_scoring` decides by the one
tiling rule (large X-ray scans in tiles, everything else whole, with the server's preprocessing;
`--tiles on|off` to force) and the same options the server and `verity eval` default to. No torch: this
runs on a scanner console with the base install.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from verity.inference.artifacts import ONNX_FILES, resolve_model
from verity.inference.decode import DEFAULT_LIMITS, DecodeError, read_image_bytes
from verity.inference.engine import PRECISIONS, OnnxEngine
from verity.inference.heatmap import heatmap_png
from verity.inference.tiling import AGGREGATES, TILING_MODES, TilingOptions, load_for_scoring, score_scan


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
    add_tiling_arguments(parser)
    return parser


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """`--tiles`, `--scale`, `--aggregate`, `--max-tiles`, defaulting to `TilingOptions()` as the
    server does (`verity predict` and `verity eval` both take them)."""
    default = TilingOptions()
    parser.add_argument(
        "--tiles",
        default=default.mode,
        choices=TILING_MODES,
        help="auto: X-ray scans over 8 model inputs long are tiled (inference/tiling.py); "
        "on: every image larger than one tile; off: never",
    )
    parser.add_argument(
        "--scale", type=float, default=default.scale, help="tile scale (0.5: tiles of 2x the input)"
    )
    parser.add_argument(
        "--aggregate", default=default.aggregate, choices=AGGREGATES, help="scan score from tile scores"
    )
    parser.add_argument("--max-tiles", type=int, default=default.max_tiles)


def tiling_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> TilingOptions:
    """The TilingOptions of the flags `add_tiling_arguments` added; a bad value is a usage error (exit 2)."""
    try:
        return TilingOptions(
            mode=args.tiles, scale=args.scale, aggregate=args.aggregate, max_tiles=args.max_tiles
        )
    except ValueError as error:
        parser.error(str(error))


def _heatmap_path(base: str, image: Path, several: bool) -> Path:
    out = Path(base)
    return out.with_name(f"{out.stem}-{image.stem}{out.suffix or '.png'}") if several else out


def predict_file(
    engine: OnnxEngine, image: Path, options: TilingOptions, heatmap: bool
) -> tuple[dict[str, Any], bytes | None]:
    """The result for one file (and its heatmap PNG when asked for)."""
    data = read_image_bytes(image, DEFAULT_LIMITS)
    loaded = load_for_scoring(data, engine.spec, options, DEFAULT_LIMITS)
    if loaded.pixels is not None:
        scan = score_scan(loaded.pixels, engine, options)
        result = {
            "score": scan.score,
            "verdict": scan.verdict,
            "tiles": len(scan.tiles),
            "grid": list(scan.grid),
            "aggregate": scan.aggregate,
        }
        return result, scan.heatmap_png(loaded.pixels) if heatmap else None
    model_input = loaded.model_input
    assert model_input is not None  # load_for_scoring sets exactly one of the two
    prediction = engine.predict([model_input], with_cam=heatmap)[0]
    png = heatmap_png(prediction.cam, model_input) if heatmap and prediction.cam is not None else None
    return {"score": prediction.score, "verdict": prediction.verdict, "tiles": 1}, png


def main(argv: list[str] | None = None) -> int:
    """Prints a verdict per image; returns 0, or 1 when any image could not be read."""
    parser = build_parser()
    args = parser.parse_args(argv)
    options = tiling_options(parser, args)
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
            result, png = predict_file(engine, image, options, bool(args.heatmap))
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
