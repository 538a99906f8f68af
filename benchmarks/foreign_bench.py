"""How many foreign images get a confident verdict, per model and group, and how many of the model's
own test images the gate flags (benchmarks/foreign_images.py says what the groups are).

Each image goes through the one scoring pipeline (`inference.pipeline.score_bytes`, as `verity predict`
and the server score it), sent as the model's modality. A confident verdict is genuine or counterfeit;
the goal is none. The models: every run of the robustness suite under data/bench-runs/ (trained with
`verity train` defaults on the real and synthetic sets), and the shipped ones.

    .venv/bin/python benchmarks/foreign_bench.py                      # every model found
    .venv/bin/python benchmarks/foreign_bench.py --models data/bench-runs/gdxray_fishbones/seed0
    .venv/bin/python benchmarks/foreign_bench.py --forms   # also each X-ray model's own test images
                                                           # flagged in every form a console writes
    .venv/bin/python benchmarks/foreign_bench.py --fresh 2000   # also, for a model of a synthetic row,
                                     # its images flagged among 2,000 fresh ones from the same generator

Why `--fresh`: a synthetic row's 76 test images resolve a flag rate of 3% only roughly, and they come
from 26 cases (a scan with its crops and patches), fewer draws than images. The same generator with
another seed makes as many new cases as asked: the rate the model flags ordinary images at, with its
95% interval (Wilson), and how many each rule flagged.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.foreign_images import (  # noqa: E402
    PRODUCT_PHOTOS,
    PSEUDO_COLOUR_SCANS,
    REAL_SET_GROUPS,
    foreign_images,
)
from benchmarks.ood_images import PROBE, OodImage  # noqa: E402
from benchmarks.real_data import SYNTH  # noqa: E402
from benchmarks.real_encodings import FORMS, grey_of  # noqa: E402
from verity.datasets.manifest import read_manifest, resolve_image_path  # noqa: E402
from verity.inference.decode import DecodeError, decode_image  # noqa: E402
from verity.inference.engine import OnnxEngine  # noqa: E402
from verity.inference.pipeline import Scored, score_bytes  # noqa: E402
from verity.inference.preprocess import is_grey_content  # noqa: E402
from verity.training.metrics import roc_auc  # noqa: E402

CONFIDENT = ("genuine", "counterfeit")


def model_dirs() -> list[Path]:
    runs = sorted(p.parent for p in (ROOT / "data" / "bench-runs").glob("*/seed*/model.onnx"))
    return runs + sorted(p.parent for p in (ROOT / "checkpoints").glob("*/*/model.onnx"))


def score(engine: OnnxEngine, data: bytes) -> Scored | None:
    try:
        return score_bytes(data, engine, with_cam=False)
    except (DecodeError, ValueError):
        return None  # refused at decode: never a verdict


def own_test_figures(engine: OnnxEngine, model_dir: Path) -> tuple[int, int, float | None]:
    """(not recognised, scored, ROC AUC of the scores) over the test split of the run's own data.jsonl."""
    manifest = model_dir / "data.jsonl"
    if not manifest.is_file():
        return 0, 0, None
    rows = [row for row in read_manifest(manifest) if row.split == "test"]
    paths = [resolve_image_path(manifest, row) for row in rows]
    if not all(path.is_file() for path in paths):  # e.g. a shipped model's synthetic set, not generated here
        return 0, 0, None
    results = [(row.target, score(engine, path.read_bytes())) for row, path in zip(rows, paths, strict=True)]
    scored = [(target, result) for target, result in results if result is not None]
    flagged = sum(1 for _, result in scored if result.recognised is False)
    targets = np.array([target for target, _ in scored])
    scores = np.array([result.score for _, result in scored])
    return flagged, len(scored), roc_auc(scores, targets)


def own_forms_flagged(engine: OnnxEngine, model_dir: Path) -> dict[str, list[int]]:
    """For an X-ray model, its own grey test images re-encoded in each form a console writes
    (`real_encodings.FORMS`: RGB and grey JPEG, RGB PNG, 16-bit PNG, TIFF and DICOS): [not recognised,
    scored] per form. The gate must not take a file's form for a foreign image. The forms are written
    from the test image's 8-bit grey plane, so a pseudo-colour or a 16-bit test image is left out."""
    manifest = model_dir / "data.jsonl"
    if engine.spec.modality != "xray" or not manifest.is_file():
        return {}
    paths = [resolve_image_path(manifest, row) for row in read_manifest(manifest) if row.split == "test"]
    if not all(path.is_file() for path in paths):  # a shipped model's synthetic set, not generated here
        return {}
    counts = {name: [0, 0] for name in FORMS}
    for path in paths:
        image = decode_image(path.read_bytes())
        if image.dtype != np.uint8 or (image.shape[2] != 1 and not is_grey_content(image)):
            continue  # the forms are written from an 8-bit grey plane
        grey = grey_of(path)
        for name, encode in FORMS.items():
            result = score(engine, encode(grey))
            if result is not None:
                counts[name][0] += int(result.recognised is False)
                counts[name][1] += 1
    return counts


def measure(model_dir: Path, images: list[OodImage], forms: bool = False, fresh: int = 0) -> dict[str, Any]:
    engine = OnnxEngine(model_dir / "model.onnx", provider="cpu", warmup=False)
    confident: Counter[str] = Counter()
    total: Counter[str] = Counter()
    causes: dict[str, Counter[str]] = {}
    for image in images:
        result = score(engine, image.data)
        total[image.group] += 1
        if result is not None and result.verdict in CONFIDENT:
            confident[image.group] += 1
        elif result is not None:
            named = [reason for reason in result.reasons if reason != "not_recognised"]
            causes.setdefault(image.group, Counter()).update(named)
    flagged, tested, roc_auc = own_test_figures(engine, model_dir)
    card_test = (engine.card.metrics or {}).get("test") or {}
    own_forms = own_forms_flagged(engine, model_dir) if forms else {}
    own_fresh = fresh_flags(engine, model_dir, fresh) if fresh else None
    return {
        "model": str(model_dir.relative_to(ROOT) if model_dir.is_relative_to(ROOT) else model_dir),
        "modality": engine.spec.modality,
        "confident": dict(confident),
        "total": dict(total),
        "causes": {group: dict(counts) for group, counts in causes.items()},
        "own_test_flagged": flagged,
        "own_test": tested,
        # The gate changes verdicts, never scores: the pipeline's ROC AUC against the card's.
        "own_test_roc_auc": roc_auc,
        "card_test_roc_auc": card_test.get("roc_auc"),
        "gate": sorted((engine.card.novelty or {}).keys()),
        "own_kind": own_kind(model_dir, engine.spec.modality),
        **({"own_test_flagged_by_form": own_forms} if own_forms else {}),
        **({"own_fresh_flagged": own_fresh} if own_fresh else {}),
    }


FRESH_SEED = 99  # the generator's seed for fresh images: none of the suite's sets uses it


def fresh_flags(engine: OnnxEngine, model_dir: Path, count: int) -> dict[str, Any] | None:
    """For a model of a synthetic row of the robustness suite, its images not recognised among `count`
    fresh ones from the same generator and options with another seed, every split (None for others):
    the count, the rate with its 95% interval, and each rule's count (the novelty, the profile and the
    joint measures; the last cause named)."""
    row = model_dir.parent.name
    if row not in SYNTH:
        return None
    modality, options = SYNTH[row]
    folder = ROOT / "data" / f"fresh-{row}-{count}"
    if not (folder / "manifest.jsonl").is_file():
        fresh = list(options)
        fresh[fresh.index("--n") + 1], fresh[fresh.index("--seed") + 1] = str(count), str(FRESH_SEED)
        command = [str(ROOT / ".venv/bin/verity"), "data", "synth", "--modality", modality, "--out"]
        subprocess.run([*command, str(folder), *fresh], check=True, capture_output=True)
    manifest = folder / "manifest.jsonl"
    gate = engine.novelty_gate
    assert gate is not None
    flagged, rules, causes = 0, Counter(), Counter()
    rows = list(read_manifest(manifest))
    for image_row in rows:
        result = score(engine, resolve_image_path(manifest, image_row).read_bytes())
        if result is None or result.recognised is not False:
            continue
        flagged += 1
        causes[result.reasons[-1]] += 1
        decoded, embedding = result.upload.decoded, result.output.embedding
        if embedding is not None and decoded.profile is not None:
            measured = gate.likeness(embedding[None], decoded.profile[None])[0]
            rules.update(rule for rule, beyond in (
                ("novelty", measured.novelty > gate.threshold),
                ("profile", (measured.profile_distance or 0.0) > (gate.profile_threshold or np.inf)),
                ("joint", (measured.joint or 0.0) > (gate.joint_threshold or np.inf)),
            ) if beyond)  # fmt: skip
    low, high = wilson_interval(flagged, len(rows))
    return {"flagged": flagged, "images": len(rows), "rate": flagged / len(rows), "interval": [low, high],
            "rules": dict(rules), "causes": dict(causes), "seed": FRESH_SEED}  # fmt: skip


def wilson_interval(successes: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a rate (95% at z = 1.96)."""
    rate, scale = successes / total, 1 + z * z / total
    centre = (rate + z * z / (2 * total)) / scale
    half = z * math.sqrt(rate * (1 - rate) / total + z * z / (4 * total * total)) / scale
    return max(0.0, centre - half), min(1.0, centre + half)


def own_kind(model_dir: Path, modality: str) -> list[str]:
    """Groups that are not foreign to this model, because it learnt from where they come from: a real
    set's group to a model trained on that set (its rows' source); and, for a model trained on the
    generators (source "synthetic"), the product photos to a photo model and the pseudo-colour scans to
    an X-ray model trained on the console styles (some of its training images in colour)."""
    manifest = model_dir / "data.jsonl"
    if not manifest.is_file():
        return []
    rows = read_manifest(manifest)
    sources = {row.source for row in rows}
    own = [group for name, group in REAL_SET_GROUPS.items() if name in sources]
    if not rows or sources != {"synthetic"}:
        return own
    if modality == "photo":
        return [*own, PRODUCT_PHOTOS]
    colour_share = (OnnxEngine(model_dir / "model.onnx", warmup=False).card.novelty or {}).get("colour_share")
    return [*own, PSEUDO_COLOUR_SCANS] if colour_share else own


def table(results: list[dict[str, Any]]) -> str:
    """Confident verdicts per group; "all foreign" leaves out the probe and each model's own kind."""
    groups = [group for group in results[0]["total"] if not group.startswith(PROBE)]
    probes = [group for group in results[0]["total"] if group.startswith(PROBE)]
    header = ["model", "all foreign", *groups, *probes, "own test flagged", "test ROC AUC: card, served"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for result in results:
        confident, total, own = result["confident"], result["total"], result.get("own_kind", [])
        foreign = [g for g in groups if g not in own]
        headline = sum(confident.get(g, 0) for g in foreign), sum(total[g] for g in foreign)
        cells = [f"{confident.get(g, 0)}/{total[g]}" + (" (own kind)" if g in own else "")
                 for g in (*groups, *probes)]  # fmt: skip
        flagged = f"{result['own_test_flagged']}/{result['own_test']}" if result["own_test"] else "n/a"
        aucs = ", ".join("n/a" if v is None else f"{v:.4f}" for v in
                         (result.get("card_test_roc_auc"), result.get("own_test_roc_auc")))  # fmt: skip
        lines.append(f"| {result['model']} ({result['modality']}) | {headline[0]}/{headline[1]} | "
                     + " | ".join(cells) + f" | {flagged} | {aucs} |")  # fmt: skip
    return "\n".join(lines)


def forms_table(results: list[dict[str, Any]]) -> str:
    """Own test images flagged per file form, for the models that were measured so (`--forms`)."""
    measured = [result for result in results if result.get("own_test_flagged_by_form")]
    if not measured:
        return ""
    lines = ["| model | " + " | ".join(FORMS) + " |", "|" + " --- |" * (len(FORMS) + 1)]
    for result in measured:
        counts = result["own_test_flagged_by_form"]
        cells = (f"{counts[name][0]}/{counts[name][1]}" for name in FORMS)
        lines.append(f"| {result['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fresh_table(results: list[dict[str, Any]]) -> str:
    """Fresh images flagged, for the models that were measured so (`--fresh`)."""
    measured = [result for result in results if result.get("own_fresh_flagged")]
    if not measured:
        return ""
    lines = ["| model | fresh images flagged | rate (95% interval) | by rule | causes |", "|" + " --- |" * 5]
    for result in measured:
        fresh = result["own_fresh_flagged"]
        low, high = fresh["interval"]
        lines.append(f"| {result['model']} | {fresh['flagged']}/{fresh['images']} | {fresh['rate']:.1%} "
                     f"({low:.1%}-{high:.1%}) | {fresh['rules']} | {fresh['causes']} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", type=Path, help="model folders (default: every one found)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "foreign.jsonl")
    parser.add_argument("--rebuild-gates", action="store_true", help="first rebuild each suite model's "
                        "gate with this code, from its own data (scores are unchanged)")
    parser.add_argument("--forms", action="store_true", help="also each X-ray model's own test images "
                        "flagged in every file form a console writes (benchmarks/real_encodings.py)")
    parser.add_argument("--fresh", type=int, default=0, metavar="N", help="also, for a model of a synthetic "
                        "row, its images flagged among N fresh ones from the same generator")
    args = parser.parse_args()
    images = foreign_images()
    results = []
    for model_dir in args.models or model_dirs():
        if args.rebuild_gates and (model_dir / "data.jsonl").is_file() and "bench-runs" in model_dir.parts:
            from verity.training.open_set import rebuild_gate

            rebuild_gate(model_dir.resolve())
        result = measure(model_dir.resolve(), images, args.forms, args.fresh)
        results.append(result)
        print(json.dumps(result), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a", encoding="utf-8") as handle:
        for result in results:
            handle.write(json.dumps(result) + "\n")
    print(table(results))
    print(forms_table(results))
    print(fresh_table(results))


if __name__ == "__main__":
    main()
