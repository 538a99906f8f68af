"""Manifests over the real sets in ../shared/real/, with one fixed split each, for measurement only.

The images stay where they are (they are not ours to ship): the manifests name them by absolute path
and live under data/real/ (ignored by git). Each set's labels.csv gives label, modality and case_id;
splits are grouped by case_id so one acquisition group never lands on both sides. A set whose
SOURCE.txt gives its own test split (gdxray_fishbones: the book's orig_split) keeps it; the rest of it
is split into train and val by case. The split is fixed (seed 0), so every training seed and the
baseline see the same test images.

The robustness suite (benchmarks/real_data.py) also measures each set in two harder forms, written by
`write_variant` under data/real/<set>-<variant>/: `sub150`, its training split subsampled to 150 images
(stratified by label, fixed seed; validation and test as in the full set), and `px32`, every image
shrunk to 32 x 32 px and saved as JPEG in its own mode (grey stays grey, RGB-encoded grey stays RGB), as
small X-ray patches and camera crops come.

    .venv/bin/python benchmarks/real_sets.py            # writes data/real/<set>/manifest.jsonl, prints counts
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import replace
from pathlib import Path

from PIL import Image

from verity.datasets.manifest import ManifestRow, read_manifest, write_manifest
from verity.datasets.rows import assign_missing_splits, split_counts
from verity.inference.vocabulary import DEFAULT_SPLIT_SEED, DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "real"
OUT = ROOT / "data" / "real"
# The sets their SOURCE.txt calls large enough to train and measure on.
TRAINABLE = ("gdxray_fishbones", "magnetic_tiles")
VARIANTS = ("full", "sub150", "px32")
SUBSAMPLED_TRAIN = 150
SHRUNK_SIDE = 32


def read_labels(folder: Path) -> list[ManifestRow]:
    """labels.csv -> rows; the set's own test split (orig_split = test) is kept, the rest left open."""
    rows = []
    with open(folder / "labels.csv", encoding="utf-8", newline="") as handle:
        for record in csv.DictReader(handle):
            split = "test" if record.get("orig_split") == "test" else None
            rows.append(
                ManifestRow(
                    str(folder / record["path"]), record["label"], record["modality"],
                    case_id=record["case_id"], source=folder.name, sha256=record.get("sha256"), split=split,
                )
            )
    return rows


def split_rows(rows: list[ManifestRow]) -> list[ManifestRow]:
    """Grouped splits: the training defaults (15% val / 15% test) by case where the set has no test
    split, else 20% of the remaining training cases for validation."""
    if any(row.split == "test" for row in rows):
        open_rows = [row for row in rows if row.split is None]
        placed = assign_missing_splits(open_rows, 0.2, 0.0, seed=0)
        by_path = {row.path: row for row in placed}
        return [by_path.get(row.path, row) for row in rows]
    return assign_missing_splits(rows, DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION, seed=DEFAULT_SPLIT_SEED)


def write_set(name: str, out: Path = OUT) -> Path:
    """Writes data/real/<name>/manifest.jsonl and returns its path."""
    rows = split_rows(read_labels(REAL / name))
    path = out / name / "manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_manifest(path, rows)
    return path


def subsample_train(rows: list[ManifestRow], n: int = SUBSAMPLED_TRAIN, seed: int = 0) -> list[ManifestRow]:
    """`n` training rows, stratified by label (each label keeps its share); other splits unchanged."""
    train = [row for row in rows if row.split == "train"]
    if len(train) <= n:
        return rows
    keep: set[str] = set()
    for label in sorted({row.label for row in train}):
        of_label = sorted((row for row in train if row.label == label), key=lambda row: row.path)
        share = max(1, round(n * len(of_label) / len(train)))
        keep.update(row.path for row in random.Random(seed).sample(of_label, min(share, len(of_label))))
    return [row for row in rows if row.split != "train" or row.path in keep]


def shrink_rows(rows: list[ManifestRow], out: Path, side: int = SHRUNK_SIDE) -> list[ManifestRow]:
    """Each image shrunk to side x side px (area filter) as JPEG in its own mode, under `out`."""
    shrunk = []
    for row in rows:
        target = out / row.label / (Path(row.path).stem + ".jpg")
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(row.path) as image:
                mode = "L" if image.mode in ("L", "I", "I;16", "1") else "RGB"
                small = image.convert(mode).resize((side, side), Image.Resampling.BOX)
            small.save(target, quality=95)
        shrunk.append(replace(row, path=str(target), sha256=None))
    return shrunk


def write_variant(name: str, variant: str = "full", out: Path = OUT) -> Path:
    """The manifest of `name` in one of VARIANTS (same split as the full set), written on first use."""
    if variant not in VARIANTS:
        raise ValueError(f"Unknown variant {variant!r}; one of {', '.join(VARIANTS)}.")
    full = write_set(name, out)
    if variant == "full":
        return full
    folder = out / f"{name}-{variant}"
    rows = list(read_manifest(full))
    rows = subsample_train(rows) if variant == "sub150" else shrink_rows(rows, folder / "images")
    path = folder / "manifest.jsonl"
    write_manifest(path, rows)
    return path


def train_command(manifest: Path, modality: str, seed: int, name: str, out: Path, *extra: str) -> list[str]:
    """`verity train` with its defaults: only data, modality, seed, where to write, and `extra`."""
    verity = str(ROOT / ".venv" / "bin" / "verity")
    return [verity, "train", "--data", str(manifest), "--modality", modality, "--seed", str(seed),
            "--name", name, "--version", f"seed{seed}", "--out", str(out), *extra]  # fmt: skip


def main() -> None:
    if not REAL.is_dir():
        raise SystemExit(f"No real sets at {REAL}: they live beside the repository, in ../shared/real/.")
    for name in sorted(p.name for p in REAL.iterdir() if (p / "labels.csv").is_file()):
        path = write_set(name)
        counts = split_counts(list(read_manifest(path)))
        print(f"{name}: {path} {json.dumps(counts)}")


if __name__ == "__main__":
    main()
