"""The robustness suite: `verity train` defaults against the plain baseline (benchmarks/baseline_finetune.py).

Rows: each real set that ../shared/real/ calls large enough to train on (manifests from
benchmarks/real_sets.py, images left in place) at full size, with its training split subsampled to 150
images (`sub150`; left out where the set has no more) and with every image shrunk to 32 px (`px32`), then
synthetic medium photo and X-ray sets, the X-ray one in the console export styles (`--export-style
mixed`: 8-bit grey, RGB-encoded grey, pseudo-colour, 16-bit, crops and small patches). Each seed runs
`verity train` with no recipe options (only data, modality, seed and where to write) and the baseline on
the same fixed split; both are scored on the test split, which nothing here tunes on.

Results are appended to benchmarks/results/real_data.jsonl (kept in the repository, with the code
version of each Verity run), so an interrupted suite resumes where it stopped. The table gives, per row,
Verity's mean, worst seed and spread against the baseline's mean, whether the row meets the rule (mean at
least the baseline's, worst seed at most 0.01 below it), and the test false-alarm and miss rates at the
model's own thresholds beside their targets (starred when outside the interval the card states for the
test split: what validation predicted for a set of its size, `calibrate.predicted_rate_interval`).

    .venv/bin/python benchmarks/real_data.py                       # every row, seeds 0 1 2 (hours)
    .venv/bin/python benchmarks/real_data.py --quick               # rows of <= 150 training images
    .venv/bin/python benchmarks/real_data.py --sets magnetic_tiles-px32 --seeds 0
    .venv/bin/python benchmarks/real_data.py --table               # print the table of what is done
    .venv/bin/python benchmarks/real_data.py --add-counts data/bench-runs   # older rows: counts from cards

A candidate recipe is measured apart from the kept results: `--results` and `--runs` put its records and
models elsewhere, and its table takes each row's baseline from the kept results when it ran none itself
(the baseline does not change with Verity's recipe), e.g. with a recipe change in the environment:

    .venv/bin/python benchmarks/real_data.py --methods verity --results /tmp/candidate.jsonl \
        --runs /tmp/candidate-runs --sets magnetic_tiles-px32
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.real_sets import (  # noqa: E402
    REAL,
    SUBSAMPLED_TRAIN,
    TRAINABLE,
    VARIANTS,
    train_command,
    write_variant,
)
from verity.datasets.manifest import read_manifest  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "real_data.jsonl"
EXPORT_FAILED = 4  # `verity train`'s exit status for a run kept after its export failed a gate
WORST_SEED_SLACK = 0.01  # a row's worst seed may lie this far below the baseline's mean
RUNS = ROOT / "data" / "bench-runs"
SYNTH = {  # name: (modality, `verity data synth` options)
    "synth_photo_medium": ("photo", ["--n", "500", "--difficulty", "medium", "--seed", "11"]),
    "synth_xray_medium_console": (
        "xray",
        ["--n", "500", "--difficulty", "medium", "--seed", "11", "--export-style", "mixed"],
    ),
}
MODALITY = {"gdxray_fishbones": "xray", "magnetic_tiles": "photo"}


def suite_rows() -> list[str]:
    """Every row of the robustness suite: each real set in each variant (a subsample that would hold the
    whole training split is the full set again, and is left out), then the synthetic sets."""
    rows = []
    for name in TRAINABLE:
        for variant in VARIANTS:
            if variant == "sub150" and train_count(name) <= SUBSAMPLED_TRAIN:
                continue
            rows.append(name if variant == "full" else f"{name}-{variant}")
    return rows + list(SYNTH)


def train_count(row: str) -> int:
    manifest, _ = manifest_for(row)
    return sum(1 for row in read_manifest(manifest) if row.split == "train")


def manifest_for(row: str) -> tuple[Path, str]:
    """The row's manifest (written on first use) and its modality."""
    name, _, variant = row.partition("-")
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
    return write_variant(name, variant or "full"), MODALITY[name]


def run_verity(
    name: str,
    manifest: Path,
    modality: str,
    seed: int,
    runs: Path = RUNS,
    target_steps: int | None = None,
    train_args: tuple[str, ...] = (),
) -> dict[str, Any]:
    """`verity train` with its defaults, its model under `runs`; the test figures come from its card.
    `target_steps`: a candidate epochs rule, about that many optimizer steps (`recipe.epochs_for`), given
    as the epochs it chooses for this row; `train_args`: a candidate's options (e.g. an augmentation
    variant), given to every run."""
    extra = [] if target_steps is None else ["--epochs", str(candidate_epochs(manifest, target_steps))]
    command = train_command(manifest, modality, seed, name, runs, *extra, *train_args)
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = completed.stdout + completed.stderr
    if completed.returncode not in (0, EXPORT_FAILED):  # a failed export keeps the run and its card
        return {"error": log[-2000:], "seconds": seconds}
    card = json.loads((runs / name / f"seed{seed}" / "card.json").read_text())
    return verity_record(card, log, seconds, export_error=completed.returncode == EXPORT_FAILED)


def verity_record(card: dict[str, Any], log: str, seconds: float, export_error: bool) -> dict[str, Any]:
    """A Verity run's record: its test figures from its card, its epochs and choices from its log."""
    test, thresholds = card["metrics"]["test"], card["thresholds"]
    chosen = next((line for line in log.splitlines() if line.startswith("chosen from the data")), "")
    epochs = [line for line in log.splitlines() if line.startswith("epoch ")]
    return {
        "test_roc_auc": test["roc_auc"],
        "test_roc_auc_ci": test.get("roc_auc_ci"),
        "val_roc_auc": card["metrics"]["val"]["roc_auc"],
        # At the model's own thresholds, beside what its card states from validation.
        "test_false_alarm_rate": test["false_alarm_rate"],
        "test_miss_rate": test["miss_rate"],
        "card_false_alarm_rate_ci": thresholds["val_false_alarm_rate_ci"],
        "card_miss_rate_ci": thresholds["val_miss_rate_ci"],
        "target_false_alarm_rate": thresholds["target_false_alarm_rate"],
        "target_miss_rate": thresholds["target_miss_rate"],
        "rate_counts": rate_counts(card),
        "epochs_run": len(epochs),
        "code_version": card.get("code_version"),
        "export_error": export_error,
        "seconds": seconds,
        "chosen": chosen,
    }


def candidate_epochs(manifest: Path, target_steps: int) -> int:
    """The epochs `recipe.epochs_for` chooses for the manifest's training split at `target_steps`."""
    from verity.training.config import TrainConfig
    from verity.training.recipe import DataProfile, epochs_for

    train = sum(1 for row in read_manifest(manifest) if row.split == "train")
    profile = DataProfile(train, 0.0, 0.0, 1.0, 0.0)  # the rule reads the count alone
    return epochs_for(profile, TrainConfig().batch_size, target_steps)[0]


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


def done(results: Path | None = None) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The finished runs recorded in `results` (default: the kept results), by (row, method, seed)."""
    results = results or RESULTS
    if not results.is_file():
        return {}
    records = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["set"], r["method"], r["seed"]): r for r in records if "error" not in r}


def with_kept_baselines(results: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """The runs in `results`, and for each row that holds no baseline run there, the kept results'
    baseline runs of that row (what a candidate recipe is compared with)."""
    measured = done(results)
    if results == RESULTS:
        return measured
    rows_with_baseline = {row for row, method, _ in measured if method == "baseline"}
    rows = {row for row, _, _ in measured}
    kept = {key: run for key, run in done().items()
            if key[1] == "baseline" and key[0] in rows - rows_with_baseline}  # fmt: skip
    return measured | kept


def rate_counts(card: dict[str, Any]) -> dict[str, int]:
    """The counts behind a run's rates: validation's false alarms and misses (what the thresholds were
    chosen on) and the test split's genuine and counterfeit images."""
    thresholds, test = card["thresholds"], card["metrics"]["test"]
    return {"val_false_alarms": thresholds["val_false_alarms"], "n_val_genuine": thresholds["n_val_genuine"],
            "val_misses": thresholds["val_misses"], "n_val_counterfeit": thresholds["n_val_counterfeit"],
            "test_genuine": test["n_genuine"], "test_counterfeit": test["n_counterfeit"]}  # fmt: skip


def predicted_interval(run: dict[str, Any], rate: str) -> list[float] | None:
    """What the run's validation predicted for its test split's rate (`calibrate.predicted_rates`, the
    interval its card states for the test split); None for a row recorded without its counts."""
    from verity.training.calibrate import predicted_rates

    counts = run.get("rate_counts")
    if not counts:
        return None
    predicted = predicted_rates(counts, counts["test_genuine"], counts["test_counterfeit"])
    return predicted[rate.removeprefix("test_")] if predicted else None


def _rate_cell(runs: list[dict[str, Any]], rate: str, interval: str) -> str:
    """Each seed's test rate at the model's thresholds, starred when outside the interval its card states
    for the test split (validation's prediction for a set of that size; a row recorded before the cards
    stated it falls back to the validation rate's own interval, marked "v")."""
    cells = []
    for run in runs:
        predicted = predicted_interval(run, rate)
        low, high = predicted if predicted is not None else run[interval]
        star = "" if low <= run[rate] <= high else "*"
        cells.append(f"{run[rate]:.3f}{star}{'' if predicted is not None else 'v'}")
    return " / ".join(cells) + f" (target {runs[0]['target_' + rate.removeprefix('test_')]:g})"


def add_counts(runs_dir: Path) -> int:
    """Adds `rate_counts` to the Verity rows recorded before them, from each run's card in `runs_dir`
    when the card is that run's (its test ROC AUC and rates equal the row's); returns how many."""
    lines = RESULTS.read_text(encoding="utf-8").splitlines()
    added, out = 0, []
    for line in lines:
        record = json.loads(line) if line.strip() else None
        path = runs_dir / str((record or {}).get("set")) / f"seed{(record or {}).get('seed')}" / "card.json"
        if record and record.get("method") == "verity" and "rate_counts" not in record and path.is_file():
            card = json.loads(path.read_text(encoding="utf-8"))
            test = card["metrics"]["test"]
            same = all(test[key] == record.get(f"test_{key}") for key in ("roc_auc", "false_alarm_rate",
                                                                             "miss_rate"))  # fmt: skip
            if same:
                record["rate_counts"] = rate_counts(card)
                line, added = json.dumps(record), added + 1
        out.append(line)
    RESULTS.write_text("\n".join(out) + "\n", encoding="utf-8")
    return added


def row_figures(runs: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, worst seed and spread of Verity's test ROC AUC against the baseline's mean, and whether
    the row meets the acceptance rule (mean >= baseline mean, worst >= baseline mean - 0.01)."""
    aucs = [run["test_roc_auc"] for run in runs]
    base = [run["test_roc_auc"] for run in baseline]
    figures = {"mean": float(np.mean(aucs)), "worst": min(aucs), "spread": max(aucs) - min(aucs)}
    if base:
        base_mean = float(np.mean(base))
        figures.update(
            baseline_mean=base_mean,
            baseline_worst=min(base),
            meets=figures["mean"] >= base_mean and figures["worst"] >= base_mean - WORST_SEED_SLACK,
        )
    return figures


def table(results: dict[tuple[str, str, int], dict[str, Any]]) -> str:
    """Markdown: one row per suite row, Verity's seeds against the baseline's, and the test rates at
    the model's own thresholds (a star marks a rate outside the interval its card states)."""
    lines = [
        "| row | Verity test ROC AUC: mean, worst, spread (seeds) | baseline mean (worst) | meets | "
        "test false-alarm rate per seed | test miss rate per seed | Verity / baseline time |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    order = [name if variant == "full" else f"{name}-{variant}" for name in TRAINABLE for variant in VARIANTS]
    order += list(SYNTH)
    names = sorted({key[0] for key in results}, key=lambda name: (order + [name]).index(name))
    for name in names:
        runs = [results[key] for key in sorted(results) if key[0] == name and key[1] == "verity"]
        baseline = [results[key] for key in sorted(results) if key[0] == name and key[1] == "baseline"]
        if not runs:
            continue
        figures = row_figures(runs, baseline)
        base_cell, meets = "not run", "?"
        if baseline:
            base_cell = f"{figures['baseline_mean']:.4f} ({figures['baseline_worst']:.4f}, {len(baseline)})"
            meets = "yes" if figures["meets"] else "**no**"
        minutes = f"{np.mean([r['seconds'] for r in runs]) / 60:.1f}"
        minutes += f" / {np.mean([r['seconds'] for r in baseline]) / 60:.1f} min" if baseline else " min"
        verity = f"{figures['mean']:.4f}, {figures['worst']:.4f}, {figures['spread']:.4f} ({len(runs)})"
        lines.append(
            f"| {name} | {verity} | {base_cell} | {meets} "
            f"| {_rate_cell(runs, 'test_false_alarm_rate', 'card_false_alarm_rate_ci')} "
            f"| {_rate_cell(runs, 'test_miss_rate', 'card_miss_rate_ci')} | {minutes} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="*", help="rows of the suite (default: all of them)")
    parser.add_argument("--quick", action="store_true", help=f"only the rows of at most {SUBSAMPLED_TRAIN} "
                        "training images (about 30 minutes on 2 cores)")
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--methods", nargs="*", default=["verity", "baseline"])
    parser.add_argument("--table", action="store_true", help="only print the table of finished runs")
    parser.add_argument("--results", type=Path, default=None, help="where the runs are recorded "
                        "(default: the kept results; another file for a candidate recipe)")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where Verity's models are written")
    parser.add_argument("--target-steps", type=int, help="a candidate epochs rule: about this many optimizer "
                        "steps (recipe.epochs_for; the default rule's is recipe.TARGET_STEPS)")
    parser.add_argument("--train-args", default="", help="a candidate's `verity train` options for every "
                        "Verity run, e.g. \"--augment-preset patch\" (with --results and --runs elsewhere)")
    parser.add_argument("--add-counts", type=Path, metavar="RUNS_DIR", help="add the rate counts to rows "
                        "recorded without them, from their runs' cards in RUNS_DIR, then print the table")
    args = parser.parse_args()
    if args.add_counts:
        print(f"{add_counts(args.add_counts)} rows given their counts")
        args.table = True
    args.results = args.results or RESULTS
    if not args.table:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        rows = args.sets or suite_rows()
        if args.quick:
            rows = [row for row in rows if train_count(row) <= SUBSAMPLED_TRAIN]
        for name in rows:
            manifest, modality = manifest_for(name)
            for seed in args.seeds:
                for method in args.methods:
                    if (name, method, seed) in done(args.results):
                        continue
                    if method == "verity":
                        record = run_verity(name, manifest, modality, seed, args.runs, args.target_steps,
                                            tuple(shlex.split(args.train_args)))  # fmt: skip
                    else:
                        record = run_baseline(manifest, seed)
                    record.update(set=name, method=method, seed=seed)
                    with open(args.results, "a", encoding="utf-8") as handle:
                        handle.write(json.dumps(record) + "\n")
                    print(json.dumps(record), flush=True)
    print(table(with_kept_baselines(args.results)))


if __name__ == "__main__":
    main()
