"""Reading `--data` into manifest rows: the one reader that ingest, training and evaluation share.

`--data` may be a manifest (JSONL), a folder holding manifest.jsonl, a labelled folder DIR/genuine/*,
DIR/counterfeit/* (a subfolder below the label names the product) or, for evaluation, split folders
DIR/<split>/<label>/*. Label folders (and label cells of an ingested table) may carry any name of
LABEL_SYNONYMS, so `verity data ingest`, `verity train --data DIR` and `verity eval --data DIR` read a
folder of real/ and fake/ images alike. Rows without a split get a grouped, label-stratified one
(datasets.split) from the vocabulary's split defaults, so a product or case never lands on both sides.

No torch here: evaluating an ONNX model reads its data through this module without loading torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from verity.datasets.manifest import ManifestRow, read_manifest, resolve_image_path
from verity.datasets.split import assign_groups, group_key, split_fractions
from verity.inference.decode import IMAGE_SUFFIXES, image_files_under
from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    LABELS,
    SPLITS,
)

MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")

# Folder (and table cell) names accepted for each label, compared in lower case.
LABEL_SYNONYMS: dict[str, str] = {
    "genuine": "genuine",
    "real": "genuine",
    "authentic": "genuine",
    "counterfeit": "counterfeit",
    "fake": "counterfeit",
}


def label_for_folder(name: str) -> str | None:
    """The label a folder (or table cell) name stands for, e.g. "Real" -> "genuine"; None if none."""
    return LABEL_SYNONYMS.get(name.strip().lower())


def label_folder_names() -> str:
    """E.g. "genuine/real/authentic or counterfeit/fake", for messages that say what is accepted."""
    return " or ".join(
        "/".join(name for name, target in LABEL_SYNONYMS.items() if target == label) for label in LABELS
    )


def label_folders(root: str | Path) -> list[tuple[str, Path]]:
    """(label, folder) for the sub-folders of `root` that name a label, genuine ones first.

    Labels come in LABELS order and folders by name within a label, so DIR/genuine and DIR/counterfeit
    are read in the order they always were (the grouped split depends on row order).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(label_for_folder(child.name), child) for child in root.iterdir() if child.is_dir()]
    return sorted(
        ((label, child) for label, child in found if label is not None),
        key=lambda item: (LABELS.index(item[0]), item[1].name),
    )


def folder_rows(root: str | Path, modality: str) -> list[ManifestRow]:
    """Rows for DIR/<label folder>/** (absolute paths, product = first subfolder)."""
    root = Path(root).resolve()
    rows = []
    for label, label_dir in label_folders(root):
        for path in image_files_under(label_dir):
            relative = path.relative_to(label_dir)
            product = relative.parts[0] if len(relative.parts) > 1 else None
            rows.append(ManifestRow(str(path), label, modality, product=product, source=str(root)))
    if not rows:
        synonyms = ", ".join(f"{name}/" for name in LABEL_SYNONYMS if name not in LABELS)
        raise ValueError(
            f"{root} holds no manifest.jsonl and no images in genuine/ or counterfeit/ subfolders "
            f"(nor {synonyms}) (image types: {', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return rows


def split_folder_rows(root: str | Path, split: str | None, modality: str) -> list[ManifestRow] | None:
    """Rows of DIR/<split>/<label folder>/** with the folder's split, for `split` (None: every split
    folder); None when `root` has no split folders."""
    root = Path(root)
    present = [name for name in SPLITS if label_folders(root / name)]
    if not present:
        return None
    if split and split not in present:
        raise ValueError(f"{root} has split folders {', '.join(present)} but no {split!r}.")
    return [
        replace(row, split=name)
        for name in ([split] if split else present)
        for row in folder_rows(root / name, modality)
    ]


def manifest_rows(manifest: str | Path, modality: str) -> tuple[list[ManifestRow], int]:
    """The manifest's rows of `modality` with absolute image paths, and how many rows were of another."""
    rows: list[ManifestRow] = []
    others: Counter[str] = Counter()
    for row in read_manifest(manifest):
        if row.modality == modality:
            rows.append(replace(row, path=str(resolve_image_path(manifest, row))))
        else:
            others[row.modality] += 1
    if not rows:
        present = ", ".join(f"{n} {name}" for name, n in sorted(others.items())) or "none"
        raise ValueError(
            f"{manifest} has no {modality} rows (rows by modality: {present}); check --modality."
        )
    return rows, sum(others.values())


def read_rows(data: str | Path, modality: str) -> tuple[list[ManifestRow], str, int]:
    """Reads a manifest, a folder with a manifest, or a labelled folder, splits as they are.

    Returns (rows with absolute paths, a one-line description of the source, rows of another modality).
    """
    path = Path(data)
    if path.is_dir():
        manifests = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        path = manifests[0] if manifests else path
    if path.is_dir():
        return folder_rows(path, modality), f"folder {path}", 0
    if path.is_file():
        rows, others = manifest_rows(path, modality)
        return rows, f"manifest {path}", others
    raise FileNotFoundError(
        f"No data at {data}: give a manifest (JSONL) or a folder DIR/genuine, DIR/counterfeit."
    )


def assign_missing_splits(
    rows: Sequence[ManifestRow], val: float, test: float, seed: int
) -> list[ManifestRow]:
    """Gives rows without a split one, grouped (case, else product, else file) and label-stratified.

    Rows that have a split keep it, and a new row of a group already placed joins that group's split.
    """
    fractions = split_fractions(val, test)
    placed: dict[str, Counter] = {split: Counter() for split in SPLITS}
    group_split: dict[str, str] = {}
    new_groups: dict[str, Counter] = {}
    for row in rows:
        if row.split:
            placed[row.split][row.label] += 1
            group_split.setdefault(group_key(row), row.split)
    for row in rows:
        if not row.split and group_key(row) not in group_split:
            new_groups.setdefault(group_key(row), Counter())[row.label] += 1
    group_split.update(assign_groups(new_groups, fractions, seed, placed))
    return [row if row.split else replace(row, split=group_split[group_key(row)]) for row in rows]


def load_rows(
    data: str | Path,
    modality: str,
    val: float = DEFAULT_VAL_FRACTION,
    test: float = DEFAULT_TEST_FRACTION,
    seed: int = DEFAULT_SPLIT_SEED,
) -> tuple[list[ManifestRow], str]:
    """Reads `--data` (see `read_rows`) into split rows, as `verity train` does.

    Returns (rows with absolute paths and a split each, a one-line description of the source).
    """
    rows, description, _ = read_rows(data, modality)
    if any(row.split is None for row in rows):
        rows = assign_missing_splits(rows, val, test, seed)
        description += f" (grouped split val={val:g} test={test:g} seed={seed} for rows without one)"
    return rows, description


def split_counts(rows: Sequence[ManifestRow]) -> dict[str, dict[str, int]]:
    """{split: {label: n}} for the model card."""
    counts = {split: dict.fromkeys(LABELS, 0) for split in SPLITS}
    for row in rows:
        counts[row.split or "train"][row.label] += 1
    return counts


def data_fingerprint(rows: Sequence[ManifestRow]) -> str:
    """sha256 over (content hash, label, split) of every row, in a fixed order.

    The image bytes are hashed where the manifest gives no sha256, so the fingerprint changes whenever
    the training data does, and does not change when the folder is moved.
    """
    entries = []
    for row in rows:
        content = row.sha256 or hashlib.sha256(Path(row.path).read_bytes()).hexdigest()
        entries.append(f"{content} {row.label} {row.split}")
    digest = hashlib.sha256()
    for entry in sorted(entries):
        digest.update(entry.encode() + b"\n")
    return "sha256:" + digest.hexdigest()
