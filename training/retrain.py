"""`verity retrain`: new seizures become a candidate model, with the evidence to promote it or not.

    verity retrain --from checkpoints/photo-default/1.0.0 --add seizures/confirmed.jsonl \
        --benchmark frozen/manifest.jsonl --version 1.1.0 [--out candidates]

One command does what the README's "Retraining on new seizures" does by hand:
1. the model's own training rows (the data.jsonl beside it, splits kept) and the new cases, ingested
   into one manifest: validated, deduplicated against the old rows, the new ones split by case;
2. `verity train --init-from` the model, on that manifest (the recipe's defaults; lineage in the card);
3. `verity compare` of the model against the candidate on the frozen benchmark, written beside the
   candidate as compare.json (a benchmark either was trained on is refused).
It never promotes: it prints the `verity promote` command that would, with the comparison behind it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from verity.datasets.ingest import IngestOptions, ingest
from verity.datasets.manifest import read_manifest, resolve_image_path, write_manifest
from verity.inference.artifacts import COMPARISON_FILE, resolve_model


def combined_manifest(model_dir: Path, new_cases: Path, out: Path, modality: str) -> dict[str, Any]:
    """The model's training rows (paths made absolute, splits kept) and the new cases ingested beside
    them into `out`; the ingest's figures."""
    from dataclasses import replace

    old = model_dir / "data.jsonl"
    if not old.is_file():
        raise ValueError(f"{model_dir} has no data.jsonl: retrain needs the rows the model learnt from.")
    rows = [replace(row, path=str(resolve_image_path(old, row))) for row in read_manifest(old)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(out, rows)
    result = ingest(new_cases, out, IngestOptions(modality=modality, progress=False))
    return {"old_rows": len(rows), "new_rows": result.accepted, "manifest": str(out)}


def retrain(model: Path, new_cases: Path, benchmark: Path, version: str, out: Path,
            train_options: dict[str, Any] | None = None) -> dict[str, Any]:  # fmt: skip
    """The three steps of the module docstring; returns where everything went and the comparison."""
    from verity.inference.engine import read_metadata
    from verity.training.compare import compare
    from verity.training.trainer import train_from_options

    onnx = resolve_model(model)
    model_dir = onnx.parent
    _, card = read_metadata(onnx)
    work = out / card.name / f"{version}.data"
    data = combined_manifest(model_dir, new_cases, work / "manifest.jsonl", card.modality)
    options = {"model": card.backbone, **(train_options or {})}  # fine-tuned as the architecture it is
    trained = train_from_options(
        data=data["manifest"], modality=card.modality, init_from=str(model_dir / "model.pt"),
        name=card.name, version=version, out=str(out), **options,
    )  # fmt: skip
    candidate = Path(trained["model_onnx"])
    comparison = compare(onnx, candidate, benchmark)
    (candidate.parent / COMPARISON_FILE).write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    return {"data": data, "candidate": str(candidate.parent), "champion": str(model_dir),
            "comparison": comparison, "name": card.name, "version": version}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from verity.training.compare import summary

    parser = argparse.ArgumentParser(prog="verity retrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--from", dest="model", required=True, type=Path, help="the serving model's folder")
    parser.add_argument("--add", required=True, type=Path, help="the new cases: confirmed.jsonl or a folder")
    parser.add_argument("--benchmark", required=True, type=Path, help="the frozen benchmark manifest")
    parser.add_argument("--version", required=True, help="the candidate's version")
    parser.add_argument("--out", type=Path, default=Path("candidates"), help="where the candidate goes")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    result = retrain(args.model, args.add, args.benchmark, args.version, args.out)
    data = result["data"]
    print(f"data: {data['old_rows']} rows the model learnt from, {data['new_rows']} new: {data['manifest']}")
    print(f"candidate: {result['candidate']}")
    print(summary(result["comparison"]))
    print(f"to promote it (never done by retrain): copy {result['candidate']} into the models folder, then "
          f"verity promote {result['name']} {result['version']} --why TEXT "
          f"--comparison {Path(result['candidate']) / COMPARISON_FILE}")  # fmt: skip
    return 0
