"""`verity predict`: verdicts for image files from the command line, through the server's pipeline.

    verity predict --model checkpoints/photo-default IMAGE... [--heatmap out.png] [--json]
                   [--product NAME [--references DIR]]

`--model` takes a model.onnx, a version folder holding one, a model folder (its newest version, in the
natural version order the server uses: `inference.artifacts`) or a folder holding one model.
Every image goes through the scoring pipeline the server runs (`inference.pipeline`): the one tiling
rule (large X-ray scans in tiles, everything else whole, with the server's preprocessing; `--tiles
on|off` to force) with the options the server and `verity eval` default to, the open-set checks and the
one verdict rule; the heatmap is drawn over the server's view (`inference.views`). No torch: this runs
on a scanner console with the base install.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from verity.inference.artifacts import ONNX_FILES, resolve_model
from verity.inference.decode import read_image_bytes
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeError
from verity.inference.dicos_report import (
    DEFAULT_UID_ROOT,
    UID_ROOT_MAX,
    UID_ROOT_PATTERN,
    ReportFacts,
    new_report_uid,
    report_for,
)
from verity.inference.engine import PRECISIONS, OnnxEngine, Prediction
from verity.inference.pipeline import ProductCheck, Scored, ScoringOptions, score_bytes
from verity.inference.references.check import ReferenceCheck
from verity.inference.references.store import DEFAULT_REFERENCES_DIR, ReferenceStore
from verity.inference.terminal import terminal_json, terminal_safe
from verity.inference.tiling import AGGREGATES, TILING_MODES, TilingOptions
from verity.inference.views import render_images


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
    parser.add_argument(
        "--format", choices=("text", "json", "dicos"), default="text",
        help="text (default), json (as --json), or dicos: also write each X-ray's DICOS Threat Detection "
        "Report, as /v1/predict answers `format=dicos`, into --reports",
    )  # fmt: skip
    parser.add_argument("--reports", default=".", metavar="DIR",
                        help="where --format dicos writes <image>.tdr.dcm (default: here)")  # fmt: skip
    parser.add_argument("--uid-root", default=DEFAULT_UID_ROOT,
                        help="the UID root of the reports (as the server's VERITY_UID_ROOT)")  # fmt: skip
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


def predict_file(
    engine: OnnxEngine,
    image: Path,
    options: TilingOptions,
    heatmap: bool,
    product_check: ProductCheck | None = None,
    evidence: bool = False,
) -> tuple[Scored, bytes | None, bytes]:
    """One file through the pipeline (with the product's reference check when one is given), its
    heatmap PNG when asked for, and the file's bytes. `evidence`: keep the activation map without a
    heatmap (a threat report's regions come from it)."""
    data = read_image_bytes(image, DEFAULT_LIMITS)
    with_cam = heatmap or evidence
    scored = score_bytes(data, engine, ScoringOptions(options), product_check, DEFAULT_LIMITS, with_cam)
    png = render_images(scored, engine.spec, heatmap=True, view=False)[0] if heatmap else None
    return scored, png, data


def write_report(scored: Scored, data: bytes, engine: OnnxEngine, image: Path, folder: Path,
                 uid_root: str, started: float) -> Path:  # fmt: skip
    """The DICOS Threat Detection Report of one scan, as the server answers `format=dicos`."""
    facts = ReportFacts(
        report_uid=new_report_uid(uid_root), verdict=scored.verdict, score=scored.score, model=scored.model,
        version=scored.version, alarm=scored.thresholds.alarm, clear=scored.thresholds.clear,
        decided=datetime.now(UTC), processing_ms=(time.perf_counter() - started) * 1000.0, uid_root=uid_root,
    )  # fmt: skip
    out = folder / f"{image.stem}.tdr.dcm"
    out.write_bytes(report_for(data, scored, engine.spec, facts, image.stem))
    return out


def cli_record(scored: Scored, image: Path, precision: str) -> dict[str, Any]:
    """The CLI's serialisation of one result (`--json` prints it; the text line is made from it)."""
    reference = scored.reference
    record: dict[str, Any] = {
        "image": str(image),
        "score": scored.score,
        "verdict": scored.verdict,
        "recognised": scored.recognised,
        "novelty": scored.novelty,
        "reasons": list(scored.reasons),
        "tiles": scored.tiles,
        "reference": reference.to_dict() if reference is not None else None,
        "alarm": scored.thresholds.alarm,
        "clear": scored.thresholds.clear,
        "model": {"name": scored.model, "version": scored.version, "precision": precision},
    }
    if scored.scan is not None:
        record.update(grid=list(scored.scan.grid), aggregate=scored.scan.aggregate)
    return record


def product_check_for(engine: OnnxEngine, product: str | None, root: str) -> ProductCheck | None:
    """The check against `product`'s genuine references in the store at `root` (None without a product).
    Raises ReferenceStoreError (a ValueError) for an unknown product, naming the known ones."""
    if product is None:
        return None
    store = ReferenceStore(Path(root))

    def check(output: Prediction) -> ReferenceCheck:
        assert output.embedding is not None  # the pipeline asks only for an output with one
        return store.check(engine, product, output.embedding, output.patches, output.patch_grid)

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


def _line(result: dict[str, Any]) -> str:
    """One image's result as the text line `verity predict` prints."""
    tiled = f", {result['tiles']} tiles ({result['aggregate']})" if result["tiles"] > 1 else ""
    model = result["model"]
    heatmap = f" heatmap {result['heatmap']}" if "heatmap" in result else ""
    report = f" report {result['report']}" if "report" in result else ""
    return (
        f"{result['image']}: {result['verdict']}{_why(result)} (score {result['score']:.3f}; counterfeit >= "
        f"{result['alarm']:g}, genuine <= {result['clear']:g}{tiled}{_novelty(result)}) "
        f"[{model['name']} {model['version']}]{heatmap}{report}"
    )


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
    report_dir = Path(args.reports) if args.format == "dicos" else None
    if not (re.match(UID_ROOT_PATTERN, args.uid_root) and len(args.uid_root) <= UID_ROOT_MAX):
        parser.error(f"--uid-root {args.uid_root!r} is not a UID root: digits and dots ending in '.', "
                     f"at most {UID_ROOT_MAX} characters (e.g. {DEFAULT_UID_ROOT}).")  # fmt: skip
    if report_dir is not None:
        if engine.spec.modality != "xray":
            parser.error(f"--format dicos writes threat reports on X-ray scans; {args.model} is a "
                         f"{engine.spec.modality} model.")  # fmt: skip
        report_dir.mkdir(parents=True, exist_ok=True)
    as_json = args.json or args.format == "json"
    failures = 0
    several = len(args.images) > 1
    check = product_check_for(engine, args.product, args.references)
    for name in args.images:
        image = Path(name)
        started = time.perf_counter()
        try:
            scored, png, data = predict_file(engine, image, options, bool(args.heatmap), check,
                                             evidence=report_dir is not None)  # fmt: skip
            report = write_report(scored, data, engine, image, report_dir, args.uid_root, started) \
                if report_dir is not None else None  # fmt: skip
        except (DecodeError, OSError, ValueError) as error:
            failures += 1
            print(terminal_safe(f"verity predict: {image}: {error}"), file=sys.stderr)
            continue
        result = cli_record(scored, image, engine.precision)
        if png is not None:
            out = _heatmap_path(args.heatmap, image, several)
            out.write_bytes(png)
            result["heatmap"] = str(out)
        if report is not None:
            result["report"] = str(report)
        # The image's name may come from a folder of seized files: no control characters reach the terminal.
        print(terminal_json(result) if as_json else terminal_safe(_line(result)))
    return 1 if failures else 0
