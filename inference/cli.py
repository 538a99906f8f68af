"""`verity predict`: verdicts for image files from the command line, with the server's own code path.

    verity predict --model checkpoints/photo-default IMAGE... [--heatmap out.png] [--json]
                   [--product NAME [--references DIR]]

`--model` takes a model.onnx, a version folder holding one, a model folder (its newest version, in the
natural version order the server uses: `inference.artifacts`) or a folder holding one model.
Every image goes through the server's own path: `inference.tiling.load_for_scoring` decides by the one
tiling rule (large X-ray scans in tiles, everything else whole, with the server's preprocessing;
`--tiles on|off` to force) and the same options the server and `verity eval` default to. No torch: this
runs on a scanner console with the base install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from verity.inference.artifacts import ONNX_FILES, resolve_model
from verity.inference.decode import DEFAULT_LIMITS, DecodeError, read_image_bytes
from verity.inference.engine import PRECISIONS, OnnxEngine, Prediction, envelope_judged
from verity.inference.heatmap import heatmap_png
from verity.inference.open_set import open_set_verdict
from verity.inference.references import DEFAULT_REFERENCES_DIR, ReferenceCheck, ReferenceStore
from verity.inference.terminal import terminal_json, terminal_safe
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
    parser.add_argument(
        "--product", help="the product the items claim to be: also check its genuine references (verity refs)"
    )
    parser.add_argument(
        "--references", default=str(DEFAULT_REFERENCES_DIR), metavar="DIR",
        help=f"the reference store --product reads (default {DEFAULT_REFERENCES_DIR}, as the server's)",
    )
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


ProductCheck = Callable[[Prediction], ReferenceCheck]


def _scored(
    engine: OnnxEngine, data: bytes, options: TilingOptions, heatmap: bool
) -> tuple[Prediction, dict[str, Any], bytes | None]:
    """The image's prediction, its tiling figures and its heatmap PNG (when asked for)."""
    loaded = load_for_scoring(data, engine.spec, options, DEFAULT_LIMITS)
    if loaded.pixels is not None:
        scan = score_scan(loaded.pixels, engine, options)
        tiling = {"tiles": len(scan.tiles), "grid": list(scan.grid), "aggregate": scan.aggregate}
        return scan.prediction, tiling, scan.heatmap_png(loaded.pixels) if heatmap else None
    model_input = loaded.model_input
    assert model_input is not None  # load_for_scoring sets exactly one of the two
    prediction = envelope_judged(
        engine.predict([model_input], with_cam=heatmap)[0], loaded.shorter_side, engine.novelty_gate
    )
    png = heatmap_png(prediction.cam, model_input) if heatmap and prediction.cam is not None else None
    return prediction, {"tiles": 1}, png


def predict_file(
    engine: OnnxEngine,
    image: Path,
    options: TilingOptions,
    heatmap: bool,
    product_check: ProductCheck | None = None,
) -> tuple[dict[str, Any], bytes | None]:
    """The result for one file (and its heatmap PNG when asked for), judged by the open-set rule with
    the product's reference check when one is given, as the server judges it."""
    prediction, tiling, png = _scored(engine, read_image_bytes(image, DEFAULT_LIMITS), options, heatmap)
    reference = None
    if product_check is not None:
        reference = product_check(prediction)
        classifier = prediction.classifier_verdict or prediction.verdict
        verdict, reasons = open_set_verdict(classifier, prediction.recognised, reference.status)
        prediction = replace(prediction, verdict=verdict, reasons=reasons)
    result = {
        "score": prediction.score,
        "verdict": prediction.verdict,
        "recognised": prediction.recognised,
        "novelty": prediction.novelty,
        "reasons": list(prediction.reasons),
        **tiling,
        "reference": reference.to_dict() if reference is not None else None,
    }
    return result, png


def product_check_for(engine: OnnxEngine, product: str | None, root: str) -> ProductCheck | None:
    """The check against `product`'s genuine references in the store at `root` (None without a product).
    Raises ReferenceStoreError (a ValueError) for an unknown product, naming the known ones."""
    if product is None:
        return None
    store = ReferenceStore(Path(root))

    def check(prediction: Prediction) -> ReferenceCheck:
        if prediction.embedding is None:
            raise ValueError(f"{engine.name} {engine.version} has no embedding output to check products.")
        return store.check(engine, product, prediction.embedding, prediction.patches)

    return check


def _why(result: dict[str, Any]) -> str:
    return f" [{', '.join(result['reasons'])}]" if result["reasons"] else ""


def _novelty(result: dict[str, Any]) -> str:
    """The gate's figure, and the product check's when a product was named."""
    text = ""
    if result["novelty"] is not None:
        seen = "recognised" if result["recognised"] else "NOT recognised"
        text += f"; novelty {result['novelty']:.3f}, {seen}"
    reference = result["reference"]
    if reference is not None:
        if reference["status"] == "abstained":
            text += (f"; {reference['product']}: abstained, {reference['references']} of "
                     f"{reference['min_references']} references needed")
        else:
            text += (f"; {reference['product']}: {reference['status']} (distance "
                     f"{reference['distance']:.3f}, threshold {reference['threshold']:.3f})")
    return text


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
    check = product_check_for(engine, args.product, args.references)
    for name in args.images:
        image = Path(name)
        try:
            result, png = predict_file(engine, image, options, bool(args.heatmap), check)
        except (DecodeError, OSError, ValueError) as error:
            failures += 1
            print(terminal_safe(f"verity predict: {image}: {error}"), file=sys.stderr)
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
            print(terminal_json(result))
        else:
            tiled = f", {result['tiles']} tiles ({args.aggregate})" if result["tiles"] > 1 else ""
            alarm, clear = engine.thresholds.alarm, engine.thresholds.clear
            line = (
                f"{image}: {result['verdict']}{_why(result)} (score {result['score']:.3f}; counterfeit >= "
                f"{alarm:g}, genuine <= {clear:g}{tiled}{_novelty(result)}) [{engine.name} {engine.version}]"
                + (f" heatmap {result['heatmap']}" if "heatmap" in result else "")
            )
            print(terminal_safe(line))  # the image's name may come from a folder of seized files
    return 1 if failures else 0
