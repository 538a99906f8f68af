"""`verity eval`: evaluate a model on a manifest split or a labelled folder; print, write JSON and HTML."""

from __future__ import annotations

import argparse
import sys

from verity.inference.cli import add_tiling_arguments, tiling_options
from verity.inference.vocabulary import SPLITS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verity eval",
        description="Evaluate a model (model.onnx through the server's engine, or model.pt in torch) and "
        "write metrics.json, predictions.csv and report.html.",
    )
    parser.add_argument(
        "--model", required=True, help="model.onnx, model.pt, or a checkpoints/<name>[/<version>] folder"
    )
    parser.add_argument(
        "--data",
        required=True,
        help="a manifest (JSONL), a folder with manifest.jsonl, or DIR/genuine + DIR/counterfeit",
    )
    parser.add_argument(
        "--split", default="test", choices=[*SPLITS, "all"], help="manifest split (default: test)"
    )
    parser.add_argument(
        "--out",
        default=None,
        help="output folder (default: a new runs/eval/<name>/<version>/<data>-<split>-<UTC time>)",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="image decoding threads")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads")
    parser.add_argument(
        "--provider", default=None, help="force an onnxruntime provider: cpu, cuda or tensorrt"
    )
    parser.add_argument("--worst", type=int, default=12, help="worst errors shown in the report")
    parser.add_argument("--no-report", action="store_true", help="skip the HTML report")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--references", metavar="DIR",
        help="a reference store (verity refs): also report recall at 1%% false alarms for the classifier, "
        "each image's product reference check, and both fused",
    )
    parser.add_argument(
        "--ood", metavar="DIR", help="images that are no product: the share the model does not recognise"
    )
    add_tiling_arguments(parser)  # the rule and defaults `verity predict` and the server use
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the evaluation and prints its summary (ROC AUC first). Returns the exit code."""
    from verity.training.eval_outputs import format_summary
    from verity.training.evaluate import evaluate

    parser = build_parser()
    args = parser.parse_args(argv)
    tiling = tiling_options(parser, args)
    result = evaluate(
        args.model,
        args.data,
        split=args.split,
        out_dir=args.out,
        batch_size=args.batch_size,
        workers=args.workers,
        provider=args.provider,
        threads=args.threads,
        progress=not args.no_progress and sys.stderr.isatty(),
        report=not args.no_report,
        worst=args.worst,
        tiling=tiling,
        references=args.references,
        ood=args.ood,
    )
    print(format_summary(result))
    return 0
