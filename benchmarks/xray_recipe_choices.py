"""The measurements behind two X-ray rules of training/recipe.py, scored on VALIDATION splits only.

1. Augmentation on small patches: the X-ray preset in full (flips and 90-degree turns, clutter
   ellipses, gamma, brightness/contrast, detector noise), the "patch" variant (no clutter, no noise) and
   none, on real X-ray patches: gdxray_fishbones (100 px) and the same patches shrunk to 32 px, the size
   of the casting patches where the full preset lost most.
2. Pseudo-colour: a 1-channel model (luma) against a 3-channel model (colour kept) on synthetic
   dual-energy scans exported in pseudo-colour, where hue carries the material.

Everything else is `verity train`'s default. Test splits are never read here; results are appended to
benchmarks/results/xray_recipe_choices.jsonl and summarised as mean and spread over seeds.

    .venv/bin/python benchmarks/xray_recipe_choices.py [--seeds 0 1] [--only augment|colour]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_sets import train_command, write_set  # noqa: E402
from verity.datasets.manifest import read_manifest, write_manifest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "xray_recipe_choices.jsonl"
RUNS = ROOT / "data" / "bench-runs" / "choices"
VERITY = str(ROOT / ".venv" / "bin" / "verity")
AUGMENT = {
    "full": ["--augment-preset", "full"],
    "patch": ["--augment-preset", "patch"],
    "none": ["--no-augment"],
}
COLOUR = {"luma (1 channel)": ["--in-chans", "1"], "colour kept (3 channels)": ["--in-chans", "3"]}


def shrunk_fishbones(size: int = 32) -> Path:
    """gdxray_fishbones at `size` px (grey JPEG, as casting patches come), same split; under data/."""
    source = write_set("gdxray_fishbones")
    out = ROOT / "data" / f"fishbones{size}"
    manifest = out / "manifest.jsonl"
    if not manifest.is_file():
        rows = []
        for row in read_manifest(source):
            target = out / row.label / Path(row.path).name
            target.parent.mkdir(parents=True, exist_ok=True)
            Image.open(row.path).convert("L").resize((size, size), Image.Resampling.BOX).save(
                target, quality=95
            )
            rows.append(replace(row, path=str(target), sha256=None))
        write_manifest(manifest, rows)
    return manifest


def pseudo_colour_set() -> Path:
    out = ROOT / "data" / "synth-xray-pseudo-colour"
    if not (out / "manifest.jsonl").is_file():
        subprocess.run(
            [
                VERITY,
                "data",
                "synth",
                "--modality",
                "xray",
                "--n",
                "400",
                "--difficulty",
                "medium",
                "--seed",
                "21",
                "--export-style",
                "pseudo-colour",
                "--out",
                str(out),
            ],
            check=True,
        )
    return out / "manifest.jsonl"


def validation_auc(name: str, manifest: Path, options: list[str], seed: int) -> dict[str, float]:
    command = train_command(
        manifest, "xray", seed, name, RUNS, "--no-report", "--no-export", "--allow-weak", *options
    )
    subprocess.run(command, check=True, capture_output=True)
    card = json.loads((RUNS / name / f"seed{seed}" / "card.json").read_text())
    return {"val_roc_auc": card["metrics"]["val"]["roc_auc"]}


def experiments(only: str | None, full: bool = False) -> list[tuple[str, str, Path, list[str]]]:
    """(study, variant, manifest, flags) for each configuration."""
    planned = []
    if only in (None, "augment"):
        # At 100 px the default reaches validation ROC AUC 1.0 on 2 of 3 seeds (benchmarks/real_data.py),
        # too near the ceiling to tell variants apart: the 32 px patches are where evidence is small.
        sets = [("fishbones 32 px", shrunk_fishbones())]
        if full:
            sets.append(("fishbones 100 px", write_set("gdxray_fishbones")))
        for set_name, manifest in sets:
            planned += [
                (f"augment, {set_name}", variant, manifest, flags) for variant, flags in AUGMENT.items()
            ]
    if only in (None, "colour"):
        planned += [
            ("colour, synthetic pseudo-colour", variant, pseudo_colour_set(), flags + ["--image-size", "160"])
            for variant, flags in COLOUR.items()
        ]
    return planned


def summary() -> None:
    records = [json.loads(line) for line in RESULTS.read_text().splitlines()] if RESULTS.is_file() else []
    print("| study | variant | val ROC AUC, mean (min-max) | seeds |\n| --- | --- | --- | --- |")
    for key in dict.fromkeys((r["study"], r["variant"]) for r in records):
        aucs = [r["val_roc_auc"] for r in records if (r["study"], r["variant"]) == key]
        print(
            f"| {key[0]} | {key[1]} | {sum(aucs) / len(aucs):.4f} ({min(aucs):.4f}-{max(aucs):.4f}) "
            f"| {len(aucs)} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1])
    parser.add_argument("--only", choices=("augment", "colour"))
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--all-sets", action="store_true", help="also the 100 px patches (saturated)")
    args = parser.parse_args()
    if not args.table:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        finished = (
            {(r["study"], r["variant"], r["seed"]) for r in map(json.loads, RESULTS.read_text().splitlines())}
            if RESULTS.is_file()
            else set()
        )
        for study, variant, manifest, flags in experiments(args.only, args.all_sets):
            for seed in args.seeds:
                if (study, variant, seed) in finished:
                    continue
                name = "".join(c if c.isalnum() else "-" for c in f"{study}-{variant}")
                record = {
                    "study": study,
                    "variant": variant,
                    "seed": seed,
                    **validation_auc(name, manifest, flags, seed),
                }
                with open(RESULTS, "a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
    summary()


if __name__ == "__main__":
    main()
