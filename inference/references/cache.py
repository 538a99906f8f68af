"""The per-engine index of a model's references, and its embeddings cache file.

    <root>/<model name>/embeddings/<key>.npz   sha256 -> embedding (and local features), for one
                                                model file (check.engine_key)

An Index holds one engine's embeddings per product, their calibrations and patch signatures; the store
(`store.ReferenceStore`) rebuilds it when the events change. The cache file only
saves embedding the stored images again: a missing or unreadable one is empty, never an error.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from verity.inference.bank import unit_rows
from verity.inference.private_files import write_atomic
from verity.inference.references.check import Calibration, ProductEntry
from verity.inference.references.patch_check import PatchCalibration

# The store's logger: a cache warning is one of the store's, wherever the code lies.
log = logging.getLogger("verity.inference.references")


@dataclass
class Index:
    """One engine's view of one model's references: embeddings per product and their calibrations."""

    generation: int = -1
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # sha -> embedding (kept across rebuilds)
    products: dict[str, np.ndarray] = field(default_factory=dict)  # product -> M x D unit rows
    members: dict[str, tuple[str, ...]] = field(default_factory=dict)  # product -> reference ids, row order
    calibrations: dict[str, Calibration] = field(default_factory=dict)
    patches: dict[str, np.ndarray] = field(default_factory=dict)  # sha -> L x C local features
    signatures: dict[str, PatchCalibration] = field(default_factory=dict)  # product -> patch check
    loaded: bool = False  # the embeddings cache file has been read into `vectors`
    saved: int = 0  # vectors in the cache file, so it is rewritten only when there are new ones

    def entry(self, product: str) -> ProductEntry:
        """The product's entry, for an index that holds it (the caller holds the store's lock)."""
        rows, calibration = self.products[product], self.calibrations[product]
        return ProductEntry(rows, self.members[product], calibration, self.signatures.get(product))


def load_cache(path: Path) -> dict[str, np.ndarray]:
    """sha -> embedding from a cache file; a missing or unreadable one is just empty (it is a cache)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shas, vectors = data["sha256"], data["embeddings"]
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError) as error:
        log.warning(
            "reference embedding cache unreadable, recomputing",
            extra={"path": str(path), "error": str(error)},
        )
        return {}
    if vectors.ndim != 2 or len(vectors) != len(shas):
        return {}
    return {str(sha): vectors[i].astype(np.float32) for i, sha in enumerate(shas)}


def load_patch_cache(path: Path) -> dict[str, np.ndarray]:
    """sha -> L x C local features from a cache file (float16 rows, split by per-image counts)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            shas, rows, counts = data["patch_sha256"], data["patches"], data["patch_counts"]
    except (OSError, ValueError, KeyError):  # missing, unreadable or without patches: recomputed
        return {}
    if rows.ndim != 2 or counts.sum() != len(rows) or len(counts) != len(shas):
        return {}
    splits = np.split(rows.astype(np.float32), np.cumsum(counts)[:-1])
    return {str(sha): unit_rows(part) for sha, part in zip(shas, splits, strict=True)}


def save_cache(path: Path, vectors: dict[str, np.ndarray], patches: dict[str, np.ndarray]) -> None:
    shas = sorted(vectors)
    patch_shas = sorted(patches)
    arrays = {"sha256": np.array(shas, dtype="U64"), "embeddings": np.stack([vectors[s] for s in shas])}
    if patch_shas:
        arrays.update(
            patch_sha256=np.array(patch_shas, dtype="U64"),
            patches=np.concatenate([patches[s] for s in patch_shas]).astype(np.float16),
            patch_counts=np.array([len(patches[s]) for s in patch_shas], dtype=np.int64),
        )
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]  # numpy stubs type the first kwarg as allow_pickle
    write_atomic(path, buffer.getvalue())
