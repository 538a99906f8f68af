"""`verity train` defaults against the plain baseline (benchmarks/baseline_finetune.py), 3 seeds a set.

The sets: the real ones that ../shared/real/ calls large enough to train on (manifests from
benchmarks/real_sets.py, images left in place), and synthetic medium photo and X-ray sets, the X-ray one
in the console export styles (`--export-style mixed`: 8-bit grey, RGB-encoded grey, pseudo-colour,
16-bit, crops and small patches). Each seed runs `verity train` with no recipe options (only data,
modality, seed and where to write) and the baseline on the same fixed split; both are scored on the test
split, which nothing here tunes on. Results are appended to benchmarks/results/real_data.jsonl, so an
interrupted run resumes where it stopped; the table prints the mean, the spread (min-max) and each
seed's 95% bootstrap interval.

    .venv/bin/python benchmarks/real_data.py                       # every set, seeds 0 1 2
    .venv/bin/python benchmarks/real_data.py --sets gdxray_fishbones --seeds 0
    .venv/bin/python benchmarks/real_data.py --table               # print the table of what is done
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_sets import REAL, TRAINABLE, train_command, write_set  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "real_data.jsonl"
RUNS = ROOT / "data" / "bench-runs"
SYNTH = {  # name: (modality, `verity data synth` options)
    "synth_photo_medium": ("photo", ["--n", "500", "--difficulty", "medium", "--seed", "11"]),
    "synth_xray_medium_console": (
        "xray",
        ["--n", "500", "--difficulty", "medium", "--seed", "11", "--export-style", "mixed"],
    ),
}
MODALITY = {"gdxray_fishbones": "xray", "magnetic_tiles": "photo"}


def manifest_for(name: str) -> tuple[Path, str]:
    """The set's manifest (written on first use) and its modality."""
    if name in SYNTH:
        modality, options = SYNTH[name]
        out = ROOT / "data" / name
        if not (out / "manifest.jsonl").is_file():
            verity = str(ROOT / ".venv/bin/verity")
            command = [verity, "data", "synth", "--modality", modality, "--out", str(out), *options]
            subprocess.run(command, check=True)
        return out / "manifest.jsonl", modality
    if not REAL.is_dir():
        raise SystemExit(f"No real sets at {REAL}: they live beside the repository.")
    return write_set(name), MODALITY[name]


def run_verity(name: str, manifest: Path, modality: str, seed: int) -> dict[str, Any]:
    """`verity train` with its defaults; the test figures come from the metrics it wrote."""
    command = train_command(manifest, modality, seed, name, RUNS)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = completed.stdout + completed.stderr
    if completed.returncode != 0:
        return {"error": log[-2000:], "seconds": seconds}
    card = json.loads((RUNS / name / f"seed{seed}" / "card.json").read_text())
    test = card["metrics"]["test"]
    chosen = next((line for line in log.splitlines() if line.startswith("chosen from the data")), "")
    return {
        "test_roc_auc": test["roc_auc"],
        "test_roc_auc_ci": test.get("roc_auc_ci"),
        "val_roc_auc": card["metrics"]["val"]["roc_auc"],
        "seconds": seconds,
        "chosen": chosen,
    }


def run_baseline(manifest: Path, seed: int) -> dict[str, Any]:
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "baseline_finetune.py"),
        "--data",
        str(manifest),
        "--seed",
        str(seed),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def done() -> dict[tuple[str, str, int], dict[str, Any]]:
    if not RESULTS.is_file():
        return {}
    records = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    return {(r["set"], r["method"], r["seed"]): r for r in records if "error" not in r}


def table(results: dict[tuple[str, str, int], dict[str, Any]]) -> str:
    """Markdown: one row per set and method, mean and spread over seeds, per-seed interval."""
    lines = [
        "| set | method | test ROC AUC, mean (min-max) | per seed [95% bootstrap interval] | train time |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name in sorted({key[0] for key in results}):
        for method in ("verity", "baseline"):
            runs = [results[key] for key in sorted(results) if key[0] == name and key[1] == method]
            if not runs:
                continue
            aucs = [run["test_roc_auc"] for run in runs]
            seeds = "; ".join(
                f"{run['test_roc_auc']:.4f}"
                + (" [{:.3f}, {:.3f}]".format(*run["test_roc_auc_ci"]) if run.get("test_roc_auc_ci") else "")
                for run in runs
            )
            minutes = sum(run["seconds"] for run in runs) / len(runs) / 60
            mean = sum(aucs) / len(aucs)
            lines.append(
                f"| {name} | {method} | {mean:.4f} ({min(aucs):.4f}-{max(aucs):.4f}) | {seeds} "
                f"| {minutes:.1f} min |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", default=[*TRAINABLE, *SYNTH])
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["verity", "baseline"])
    parser.add_argument("--table", action="store_true", help="only print the table of finished runs")
    args = parser.parse_args()
    if not args.table:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            manifest, modality = manifest_for(name)
            for seed in args.seeds:
                for method in args.methods:
                    if (name, method, seed) in done():
                        continue
                    if method == "verity":
                        record = run_verity(name, manifest, modality, seed)
                    else:
                        record = run_baseline(manifest, seed)
                    record.update(set=name, method=method, seed=seed)
                    with open(RESULTS, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)
    print(table(done()))


if __name__ == "__main__":
    main()
