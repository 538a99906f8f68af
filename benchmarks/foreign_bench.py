"""How many foreign images get a confident verdict, per model and group, and how many of the model's
own test images the gate flags (benchmarks/foreign_images.py says what the groups are).

Each image goes through the one scoring pipeline (`inference.pipeline.score_bytes`, as `verity predict`
and the server score it), sent as the model's modality. A confident verdict is genuine or counterfeit;
the goal is none. The models: every run of the robustness suite under data/bench-runs/ (trained with
`verity train` defaults on the real and synthetic sets), and the shipped ones.

    .venv/bin/python benchmarks/foreign_bench.py                      # every model found
    .venv/bin/python benchmarks/foreign_bench.py --models data/bench-runs/gdxray_fishbones/seed0
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.foreign_images import foreign_images  # noqa: E402
from benchmarks.ood_images import PROBE, OodImage  # noqa: E402
from verity.datasets.manifest import read_manifest, resolve_image_path  # noqa: E402
from verity.inference.decode import DecodeError  # noqa: E402
from verity.inference.engine import OnnxEngine  # noqa: E402
from verity.inference.pipeline import Scored, score_bytes  # noqa: E402

CONFIDENT = ("genuine", "counterfeit")


def model_dirs() -> list[Path]:
    runs = sorted(p.parent for p in (ROOT / "data" / "bench-runs").glob("*/seed*/model.onnx"))
    return runs + sorted(p.parent for p in (ROOT / "checkpoints").glob("*/*/model.onnx"))


def score(engine: OnnxEngine, data: bytes) -> Scored | None:
    try:
        return score_bytes(data, engine, with_cam=False)
    except (DecodeError, ValueError):
        return None  # refused at decode: never a verdict


def own_test_flagged(engine: OnnxEngine, model_dir: Path) -> tuple[int, int]:
    """(not recognised, scored) over the test split of the run's own data.jsonl."""
    manifest = model_dir / "data.jsonl"
    if not manifest.is_file():
        return 0, 0
    paths = [resolve_image_path(manifest, row) for row in read_manifest(manifest) if row.split == "test"]
    if not all(path.is_file() for path in paths):  # e.g. a shipped model's synthetic set, not generated here
        return 0, 0
    results = [score(engine, path.read_bytes()) for path in paths]
    scored = [result for result in results if result is not None]
    return sum(1 for result in scored if result.recognised is False), len(scored)


def measure(model_dir: Path, images: list[OodImage]) -> dict[str, Any]:
    engine = OnnxEngine(model_dir / "model.onnx", provider="cpu", warmup=False)
    confident: Counter[str] = Counter()
    total: Counter[str] = Counter()
    causes: Counter[str] = Counter()
    for image in images:
        result = score(engine, image.data)
        total[image.group] += 1
        if result is not None and result.verdict in CONFIDENT:
            confident[image.group] += 1
        elif result is not None:
            causes.update(reason for reason in result.reasons if reason != "not_recognised")
    flagged, tested = own_test_flagged(engine, model_dir)
    return {
        "model": str(model_dir.relative_to(ROOT)),
        "modality": engine.spec.modality,
        "confident": dict(confident),
        "total": dict(total),
        "causes": dict(causes),
        "own_test_flagged": flagged,
        "own_test": tested,
    }


def table(results: list[dict[str, Any]]) -> str:
    groups = [group for group in results[0]["total"] if not group.startswith(PROBE)]
    probes = [group for group in results[0]["total"] if group.startswith(PROBE)]
    header = ["model", "all foreign", *groups, *probes, "own test flagged"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        confident, total = result["confident"], result["total"]
        headline = sum(confident.get(g, 0) for g in groups), sum(total[g] for g in groups)
        cells = [f"{confident.get(g, 0)}/{total[g]}" for g in (*groups, *probes)]
        own = f"{result['own_test_flagged']}/{result['own_test']}" if result["own_test"] else "n/a"
        lines.append(f"| {result['model']} ({result['modality']}) | {headline[0]}/{headline[1]} | "
                     + " | ".join(cells) + f" | {own} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", type=Path, help="model folders (default: every one found)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "foreign.jsonl")
    args = parser.parse_args()
    images = foreign_images()
    results = []
    for model_dir in args.models or model_dirs():
        result = measure(model_dir.resolve(), images)
        results.append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
