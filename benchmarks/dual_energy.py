"""Dual energy against single energy on the same parcels: `verity train` with its defaults, 3 seeds.

The generator renders each parcel once and detects it either at two energies (a two-page 16-bit TIFF:
high, low; the defaults then train a 2-channel model) or as one single-energy scan (the attenuation
averaged over both energies, as a single-energy scanner sees it; a 1-channel model). Same seed, so the
same parcels, labels, cues and splits on both sides; only what the scanner measured differs.

    .venv/bin/python benchmarks/dual_energy.py [--n 400] [--size 160] [--seeds 0 1 2] [--fast]
    .venv/bin/python benchmarks/dual_energy.py --table     # what is done

`--fast` trains both forms alike at a 96 px input for 16 epochs (`verity train --image-size 96 --epochs 16
--allow-weak`), about a sixth of the defaults' time on 2 cores (they choose 224 px and 28 epochs here),
and keeps a run that did not beat chance on validation (its test ROC AUC is the figure compared); a
comparison, not the best either form can do.

Each run's test ROC AUC (from the card `verity train` writes) goes to benchmarks/results/dual_energy.jsonl;
the table gives each form's mean, worst seed and spread, and the dual - single difference per seed.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_sets import train_command  # noqa: E402
from verity.datasets.manifest import read_manifest  # noqa: E402
from verity.datasets.synth import generate  # noqa: E402

DATA = ROOT / "data" / "bench-dual"
RUNS = DATA / "runs"
RESULTS = ROOT / "benchmarks" / "results" / "dual_energy.jsonl"
FORMS = ("dual", "single")


def make_sets(n: int, size: int, data_seed: int) -> dict[str, Path]:
    """The same parcels as two sets; checks that their rows (label, split, case) agree."""
    manifests = {}
    for form in FORMS:
        out = DATA / f"{form}-n{n}-s{size}-seed{data_seed}"
        if not (out / "manifest.jsonl").is_file():
            generate("xray", n, out, seed=data_seed, size=size, dual_energy=form == "dual")
        manifests[form] = out / "manifest.jsonl"
    rows = {form: [(r.label, r.split, r.case_id) for r in read_manifest(manifests[form])] for form in FORMS}
    if rows["dual"] != rows["single"]:
        raise SystemExit("The two sets do not hold the same parcels: the generator's rows differ.")
    return manifests


FAST = ("--image-size", "96", "--epochs", "16", "--allow-weak")


def run(form: str, manifest: Path, seed: int, extra: tuple[str, ...]) -> dict[str, Any]:
    name = f"{form}-{manifest.parent.name}" + ("-fast" if extra else "")
    started = time.perf_counter()
    command = train_command(manifest, "xray", seed, name, RUNS, *extra)
    completed = subprocess.run(command, capture_output=True, text=True)
    log = completed.stdout + completed.stderr
    card_path = RUNS / name / f"seed{seed}" / "card.json"
    if not card_path.is_file():
        return {"error": log[-2000:]}
    card = json.loads(card_path.read_text())
    chosen = next((line for line in log.splitlines() if line.startswith("chosen from the data")), "")
    return {
        "test_roc_auc": card["metrics"]["test"]["roc_auc"],
        "test_roc_auc_ci": card["metrics"]["test"].get("roc_auc_ci"),
        "in_chans": card["spec"]["in_chans"],
        "seconds": round(time.perf_counter() - started, 1),
        "chosen": chosen,
    }


def done() -> dict[tuple[str, str, int], dict[str, Any]]:
    if not RESULTS.is_file():
        return {}
    lines = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["set"], r["form"], r["seed"]): r for r in lines if "test_roc_auc" in r}


def table(results: dict[tuple[str, str, int], dict[str, Any]]) -> str:
    lines = ["| set | form | channels | seeds | mean ROC AUC | worst seed | spread |",
             "| --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    diffs: list[str] = []
    for name in sorted({key[0] for key in results}):
        by_form = {form: {seed: r for (n, f, seed), r in results.items() if (n, f) == (name, form)}
                   for form in FORMS}  # fmt: skip
        for form, runs in by_form.items():
            if not runs:
                continue
            aucs = np.array([r["test_roc_auc"] for r in runs.values()])
            chans = "/".join(map(str, sorted({r["in_chans"] for r in runs.values()})))
            lines.append(f"| {name} | {form} | {chans} | {len(aucs)} | {aucs.mean():.4f} | "
                         f"{aucs.min():.4f} | {aucs.max() - aucs.min():.4f} |")  # fmt: skip
        both = sorted(set(by_form["dual"]) & set(by_form["single"]))
        if both:
            each = [by_form["dual"][s]["test_roc_auc"] - by_form["single"][s]["test_roc_auc"] for s in both]
            diffs.append(f"{name}: dual - single per seed {', '.join(f'{d:+.4f}' for d in each)} "
                         f"(mean {np.mean(each):+.4f}, worst {min(each):+.4f})")  # fmt: skip
    return "\n".join(lines + [""] + diffs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400, help="parcels (both labels, all splits)")
    parser.add_argument("--size", type=int, default=160, help="scan size in pixels")
    parser.add_argument("--data-seed", type=int, default=7)
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--fast", action="store_true", help="96 px input, 16 epochs (both forms alike)")
    parser.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    if not args.table:
        manifests = make_sets(args.n, args.size, args.data_seed)
        name = f"n{args.n}-s{args.size}-seed{args.data_seed}" + ("-fast" if args.fast else "")
        for seed in args.seeds:
            for form in FORMS:
                if (name, form, seed) in done():
                    continue
                extra = FAST if args.fast else ()
                result = {**run(form, manifests[form], seed, extra), "set": name, "form": form, "seed": seed}
                RESULTS.parent.mkdir(parents=True, exist_ok=True)
                with RESULTS.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
    print(table(done()))


if __name__ == "__main__":
    main()
