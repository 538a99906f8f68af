"""The torch Dataset over manifest rows, and the helpers that turn `--data` into split rows.

Each item goes through the server's own decoder: `decode_image` then `to_model_input`, with the training
augmentation applied to the decoded array in between (training only). `--data` may be a manifest, a
folder holding manifest.jsonl, or a labelled folder DIR/genuine/*, DIR/counterfeit/* (a subfolder below
the label names the product); rows without a split get a grouped, label-stratified one
(datasets.split), so a product or case never lands on both sides.

This is the one module of `datasets/` that imports torch.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from verity.datasets.manifest import (
    LABEL_SYNONYMS,
    LABELS,
    SPLITS,
    ManifestRow,
    label_folders,
    read_manifest,
    resolve_image_path,
)
from verity.datasets.split import assign_groups, group_key, split_fractions
from verity.inference.decode import decode_image
from verity.inference.preprocess import to_model_input
from verity.inference.spec import PreprocessSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".dcm", ".dicom"}
MANIFEST_NAMES = ("manifest.jsonl", "manifest.json")

# An augmenter takes a decoded HxWxC array and returns (augmented array, spec to preprocess it with).
Augment = Callable[[np.ndarray], tuple[np.ndarray, PreprocessSpec]]


def folder_rows(root: str | Path, modality: str) -> list[ManifestRow]:
    """Rows for DIR/<label folder>/** (absolute paths, product = first subfolder).

    Label folders are named as `verity data ingest` accepts them (datasets.manifest.LABEL_SYNONYMS:
    genuine/, real/, fake/, ...), so train, eval and ingest read one folder alike.
    """
    root = Path(root).resolve()
    rows = []
    for label, label_dir in label_folders(root):
        for path in sorted(label_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                relative = path.relative_to(label_dir)
                product = relative.parts[0] if len(relative.parts) > 1 else None
                rows.append(ManifestRow(str(path), label, modality, product=product, source=str(root)))
    if not rows:
        synonyms = ", ".join(f"{name}/" for name in LABEL_SYNONYMS if name not in LABELS)
        raise ValueError(
            f"{root} holds no manifest.jsonl and no images in genuine/ or counterfeit/ subfolders "
            f"(nor {synonyms}) "
            f"(image types: {', '.join(sorted(IMAGE_SUFFIXES))})."
        )
    return rows


def manifest_rows(manifest: str | Path, modality: str) -> list[ManifestRow]:
    """The manifest's rows of `modality`, with absolute image paths."""
    rows, others = [], Counter()
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
    return rows


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
    data: str | Path, modality: str, val: float = 0.15, test: float = 0.15, seed: int = 0
) -> tuple[list[ManifestRow], str]:
    """Reads `--data` (manifest, folder with a manifest, or labelled folder) into split rows.

    Returns (rows with absolute paths and a split each, a one-line description of the source).
    """
    path = Path(data)
    if path.is_dir():
        manifests = [path / name for name in MANIFEST_NAMES if (path / name).is_file()]
        path = manifests[0] if manifests else path
    if path.is_dir():
        rows, description = folder_rows(path, modality), f"folder {path}"
    elif path.is_file():
        rows, description = manifest_rows(path, modality), f"manifest {path}"
    else:
        raise FileNotFoundError(
            f"No data at {data}: give a manifest (JSONL) or a folder DIR/genuine, DIR/counterfeit."
        )
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


class ManifestDataset(Dataset):
    """Rows -> (CxSxS float32 tensor in [0, 1], class index), decoded exactly as the server decodes.

    A key may be an index or (index, augmentation seed): the trainer's sampler hands out seeds, so each
    sample's augmentation depends on (run seed, epoch, index) only, not on which worker decodes it,
    and a resumed run sees the same augmentations it would have seen.
    """

    def __init__(
        self,
        rows: Sequence[ManifestRow],
        spec: PreprocessSpec,
        augment: Augment | None = None,
        seed_augment: Callable[[int], None] | None = None,
    ) -> None:
        self.rows = list(rows)
        self.spec = spec
        self.augment = augment
        self.seed_augment = seed_augment
        self.targets = [row.target for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        row = self.rows[index]
        try:
            image = decode_image(Path(row.path).read_bytes(), draft_size=self.spec.image_size)
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read training image {row.path}: {error}") from error
        spec = self.spec
        if self.augment is not None:
            if seed is not None and self.seed_augment is not None:
                self.seed_augment(seed)
            image, spec = self.augment(image)
        return torch.from_numpy(to_model_input(image, spec)), row.target
