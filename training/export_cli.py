"""`verity export`: rebuild a model from model.pt and export it to ONNX behind the parity gate; or, with
--triton, write an exported model as a Triton model repository (inference/triton_repository.py; no torch
needed for that)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from verity.inference.card import ModelCard
from verity.inference.gate_record import card_with_gate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verity export",
        description="Export a checkpoint to a single-file ONNX model with its spec and card in the metadata. "
        "The export fails, and writes nothing, when torch and onnxruntime disagree by more than 1e-4.",
    )
    parser.add_argument("--checkpoint", help="model.pt written by `verity train` (not with --triton)")
    parser.add_argument("--triton", metavar="DIR", help="write --model as a Triton model repository in DIR")
    parser.add_argument("--model", help="with --triton: an exported model.onnx, its version or model folder")
    parser.add_argument("--max-batch-size", type=int, default=8, help="with --triton: largest batch")
    parser.add_argument("--queue-delay-us", type=int, default=4000,
                        help="with --triton: how long Triton waits to fill a batch (us)")  # fmt: skip
    parser.add_argument("--instances", type=int, default=1, help="with --triton: classifier instances")
    parser.add_argument(
        "--out", default=None, help="output .onnx path (default: model.onnx beside the checkpoint)"
    )
    parser.add_argument(
        "--sample", action="append", default=[], help="an image to include in the parity check (repeatable)"
    )
    parser.add_argument("--exporter", default="torchscript", choices=["torchscript", "dynamo"])
    from verity.training.quantize import add_export_arguments

    add_export_arguments(parser)  # --int8 (gated), --fp16, --val-data, --calibration-images
    parser.add_argument(
        "--bank-data",
        help="data whose train split becomes the training bank and whose val split sets the novelty "
        "threshold (default: --val-data, else the data the checkpoint was trained on, when present)",
    )
    parser.add_argument(
        "--novelty-rate", type=float, default=0.01,
        help="share of in-distribution validation images the not-recognised gate may flag",
    )
    parser.add_argument("--max-references", type=int, default=10_000, help="bank rows at most (subsampled)")
    return parser


def bank_data(args: argparse.Namespace, checkpoint: dict[str, Any]) -> str | None:
    """Where the bank comes from: --bank-data, --val-data, or the checkpoint's training data if it exists."""
    for candidate in (args.bank_data, args.val_data, (checkpoint.get("config") or {}).get("data")):
        if candidate and Path(candidate).exists():
            return str(candidate)
        if candidate and candidate in (args.bank_data, args.val_data):
            raise ValueError(f"No data at {candidate} for the training bank.")
    return None


def card_from_checkpoint(checkpoint: dict[str, Any], path: Path) -> ModelCard:
    """The card stored in the checkpoint, or one built from the checkpoint's fields."""
    from verity.training.calibrate import card_warnings
    from verity.training.checkpoint import checkpoint_spec

    if isinstance(checkpoint.get("card"), dict):
        # The embedding width and the novelty gate describe an export; this export sets them anew
        # (a newer Verity may embed differently from the one that trained the checkpoint).
        return replace(ModelCard.from_dict(checkpoint["card"]), embedding_dim=None, novelty=None)
    thresholds = checkpoint.get("thresholds")
    if not thresholds or "alarm" not in thresholds:
        raise ValueError(
            f"{path} has no decision thresholds (was validation missing counterfeits?); the server refuses a "
            "model without them. Retrain with counterfeits in the validation split."
        )
    spec = checkpoint_spec(checkpoint)
    config = checkpoint.get("config") or {}
    calibration = checkpoint.get("calibration") or {}
    return ModelCard(
        name=str(config.get("name") or path.resolve().parent.parent.name),
        version=str(config.get("version") or path.resolve().parent.name),
        modality=spec.modality,
        backbone=str(checkpoint["model_name"]),
        spec=spec,
        thresholds=thresholds,
        temperature=float(calibration.get("temperature", 1.0)),
        metrics=checkpoint.get("metrics") or {},
        data_fingerprint=str(checkpoint.get("data_fingerprint", "unknown")),
        data_counts=checkpoint.get("data_counts") or config.get("data_counts") or {},
        code_version=str(checkpoint.get("code_version", "unknown")),
        warnings=tuple(card_warnings(thresholds)),
    )


def triton_main(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """`verity export --triton DIR --model M`: the repository, and what it holds."""
    from verity.inference.engine import ModelLoadError
    from verity.inference.triton_repository import write_repository

    if not args.model:
        parser.error("--triton needs --model: the exported model (model.onnx, or its folder)")
    for name, least in (("max_batch_size", 1), ("queue_delay_us", 0), ("instances", 1)):
        if getattr(args, name) < least:
            parser.error(f"--{name.replace('_', '-')} must be at least {least}")
    try:
        written = write_repository(Path(args.model), Path(args.triton), max_batch_size=args.max_batch_size,
                                   queue_delay_us=args.queue_delay_us, instances=args.instances)  # fmt: skip
    except (ModelLoadError, FileNotFoundError, OSError) as error:
        print(f"verity export: {error}", file=sys.stderr)
        return 1
    files = ", ".join(str(path.relative_to(args.triton)) for path in written)
    print(f"Triton repository in {args.triton}: {files}")
    return 0


def exported_card(
    card: ModelCard, result: dict[str, Any], novelty: dict[str, Any] | None, int8_gate: dict[str, Any] | None
) -> ModelCard:
    """card.json as the ONNX metadata records it: the embedding width, the gate with its warnings, and the
    INT8 gate, passed or not."""
    card = card_with_gate(replace(card, embedding_dim=result["embedding_dim"]), novelty)
    return card if int8_gate is None else replace(card, int8=int8_gate)


def print_export(
    out: Path,
    card_path: Path,
    result: dict[str, Any],
    novelty: dict[str, Any] | None,
    variant_lines: list[str],
) -> None:
    """Where the model went, its parity figures, its gate and its variants."""
    from verity.training.export import PARITY_TOLERANCE

    print(
        f"exported {out} ({result['size_bytes'] / 1e6:.1f} MB, opset {result['opset']}, "
        f"{result['exporter']} exporter); "
        f"parity max |delta logit| {result['max_abs_diff']:.2e} ({result['max_rel_diff_logits']:.1e} of the "
        f"largest, tolerance {PARITY_TOLERANCE['logits']:g}); card {card_path}"
    )
    if result["embedding_dim"] is not None:
        print(f"embedding: {result['embedding_dim']} wide, parity max |delta| "
              f"{result['max_abs_diff_embedding']:.2e} <= {PARITY_TOLERANCE['embedding']:g}")
    if novelty is not None:
        from verity.training.open_set import describe

        print(describe(novelty))
    elif result["embedding_dim"] is not None:
        print("novelty gate: none (no --bank-data, and the training data is not here): every image is "
              "served as recognised is unknown")
    for line in variant_lines:
        print(line)


def main(argv: list[str] | None = None) -> int:
    """Exports, prints where the model went and the parity figure. Returns the exit code."""
    import numpy as np

    from verity.inference.preprocess import load_for_model
    from verity.training.checkpoint import load_checkpoint, model_from_checkpoint
    from verity.training.export import export_onnx

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.triton:
        return triton_main(parser, args)
    if not args.checkpoint:
        parser.error("give --checkpoint (model.pt), or --triton DIR with --model")
    from verity.training.checkpoint import checkpoint_spec

    checkpoint_path = Path(args.checkpoint)
    checkpoint = load_checkpoint(checkpoint_path)
    spec = checkpoint_spec(checkpoint)
    card = card_from_checkpoint(checkpoint, checkpoint_path)
    model = model_from_checkpoint(checkpoint)
    sample = np.stack([load_for_model(Path(p), spec) for p in args.sample]) if args.sample else None
    out = Path(args.out) if args.out else checkpoint_path.with_name("model.onnx")
    result = export_onnx(model, spec, card, out, sample=sample, exporter=args.exporter)
    novelty = None
    data = bank_data(args, checkpoint) if result["embedding_dim"] is not None else None
    if data is not None:
        from verity.training.open_set import build_open_set

        novelty = build_open_set(out, data, rate=args.novelty_rate, max_references=args.max_references)
    from verity.training.quantize import run_export_variants

    variant_lines, int8_gate = run_export_variants(args, out)
    card_path = out.with_name("card.json")
    exported = exported_card(card, result, novelty, int8_gate)
    card_path.write_text(exported.to_json(indent=2) + "\n", encoding="utf-8")
    print_export(out, card_path, result, novelty, variant_lines)
    return 0
