"""The reference bank: embeddings of known images beside the model, and kNN novelty against them.

A bank is one `bank.npz` file beside model.onnx, written and read with numpy alone (no torch, no pickle):
the embeddings as float16 (half the size of float32: on the shipped photo model's validation images the
novelty moves by at most 2e-6, against a median of 4e-3 and a gate at 5e-3), one label and one
product name per row (the product "" when none is known), and a JSON provenance record (which model,
which data, when, how many images before subsampling, the seed). A bank keeps at most MAX_REFERENCES
rows: more are subsampled uniformly with a seeded generator, so the same inputs always give the same
bank.

Search is behind one small interface, `BruteForceSearch` (`search` for neighbours, `similarities` for
novelty and the gate's joint measure): exact cosine kNN by one float32 matrix product over a contiguous
D x rows copy, 4 x rows x D bytes held twice (11.5 MB for 10,000 references of D = 144).
`benchmarks/bank_bench.py` measures its query time at 10,000 and 100,000 references.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

BANK_FILE = "bank.npz"
BANK_FORMAT = 1
MAX_REFERENCES = 10_000
DEFAULT_K = 5
_ARRAYS = ("embeddings", "labels", "products", "provenance", "format")


class BankError(ValueError):
    """A bank file that is missing, malformed, or inconsistent with what it is used with."""


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to length 1 in float32 (an all-zero row stays zero rather than dividing by zero)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


class BruteForceSearch:
    """Exact cosine kNN over unit-length references: one matrix product per query batch."""

    def __init__(self, references: np.ndarray) -> None:
        self.references = unit_rows(references)  # float32 once, not per query
        # D x M contiguous: a query row times it is one BLAS call reading the bank in order (twice as
        # fast as multiplying by the transposed view at 10,000 x 144).
        self.columns = np.ascontiguousarray(self.references.T)

    def similarities(self, queries: np.ndarray) -> np.ndarray:
        """The cosine similarity of each unit-length query row to every reference (N x M)."""
        return np.asarray(queries, dtype=np.float32) @ self.columns

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, indices), each N x k, nearest first, for unit-length N x D queries."""
        if not 1 <= k <= len(self.references):
            raise BankError(f"k must be between 1 and the bank's {len(self.references)} rows, got {k}.")
        similarity = self.similarities(queries)
        if k < similarity.shape[1]:
            top = np.argpartition(similarity, -k, axis=1)[:, -k:]  # the k largest, in no order
        else:
            top = np.broadcast_to(np.arange(k), (len(similarity), k))
        picked = np.take_along_axis(similarity, top, axis=1)
        order = np.argsort(-picked, axis=1, kind="stable")
        return np.take_along_axis(picked, order, axis=1), np.take_along_axis(top, order, axis=1)


@dataclass(eq=False)
class ReferenceBank:
    """M unit-length float16 embeddings with their labels, products and provenance."""

    embeddings: np.ndarray  # M x D float16
    labels: np.ndarray  # M str
    products: np.ndarray  # M str, "" where no product is known
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.embeddings.dtype != np.float16 or len(self.embeddings) == 0:
            raise BankError(
                f"Bank embeddings must be a non-empty M x D float16 array, got "
                f"{self.embeddings.dtype} {self.embeddings.shape}."
            )
        if self.labels.shape != (len(self.embeddings),) or self.products.shape != self.labels.shape:
            raise BankError(
                f"A bank of {len(self.embeddings)} rows needs as many labels and products, got "
                f"{self.labels.shape} and {self.products.shape}."
            )

    def __len__(self) -> int:
        return len(self.embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    @cached_property
    def index(self) -> BruteForceSearch:
        return BruteForceSearch(self.embeddings)


def top_k(similarity: np.ndarray, k: int) -> np.ndarray:
    """The k largest values of each row (N x k, in no order)."""
    if k == similarity.shape[1]:
        return similarity
    return np.partition(similarity, similarity.shape[1] - k, axis=1)[:, -k:]


def subsample_indices(total: int, max_references: int, seed: int) -> np.ndarray:
    """Sorted row indices to keep: all of them up to `max_references`, else a seeded uniform choice."""
    if total <= max_references:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=max_references, replace=False))


def build_bank(
    embeddings: np.ndarray,
    labels: list[str] | np.ndarray,
    products: list[str] | np.ndarray | None = None,
    provenance: dict[str, Any] | None = None,
    *,
    max_references: int = MAX_REFERENCES,
    seed: int = 0,
) -> ReferenceBank:
    """A bank of at most `max_references` of these rows (see `subsample_indices`), stored as float16.

    The provenance gains `created`, `total` (rows given), `max_references` and `seed`."""
    embeddings = np.asarray(embeddings)
    if embeddings.ndim != 2:
        raise BankError(f"Embeddings must be an M x D array, got shape {embeddings.shape}.")
    label_array = np.asarray(labels, dtype=str)
    product_array = np.full(len(embeddings), "", dtype=str) if products is None else np.asarray(products, str)
    if label_array.shape != (len(embeddings),) or product_array.shape != label_array.shape:
        raise BankError(f"{len(embeddings)} embeddings need as many labels and products.")
    keep = subsample_indices(len(embeddings), max_references, seed)
    record = {
        **(provenance or {}),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "total": int(len(embeddings)),
        "max_references": int(max_references),
        "seed": int(seed),
    }
    return ReferenceBank(
        unit_rows(embeddings[keep]).astype(np.float16), label_array[keep], product_array[keep], record
    )


def save_bank(bank: ReferenceBank, path: str | Path) -> Path:
    """Writes the bank to `path` atomically (a reader never sees half a file), readable by all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(suffix=".npz.tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:  # a file object: numpy then adds no .npz of its own
            np.savez(
                stream,
                embeddings=bank.embeddings,
                labels=bank.labels.astype(str),
                products=bank.products.astype(str),
                provenance=np.array(json.dumps(bank.provenance, sort_keys=True)),
                format=np.array(BANK_FORMAT),
            )
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return path


def load_bank(path: str | Path) -> ReferenceBank:
    """Reads a bank written by `save_bank` (no pickle: object arrays are refused)."""
    path = Path(path)
    if not path.is_file():
        raise BankError(f"No reference bank at {path}.")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except (OSError, ValueError) as error:  # not a zip, a damaged one, or arrays that need pickle
        raise BankError(f"{path} is not a readable reference bank: {error}") from error
    missing = [name for name in _ARRAYS if name not in arrays]
    if missing:
        raise BankError(f"{path} lacks {', '.join(missing)}: not a Verity reference bank.")
    if int(arrays["format"]) != BANK_FORMAT:
        raise BankError(f"{path} is bank format {int(arrays['format'])}; this code reads {BANK_FORMAT}.")
    return ReferenceBank(
        arrays["embeddings"], arrays["labels"], arrays["products"], json.loads(str(arrays["provenance"]))
    )


def novelty(embeddings: np.ndarray, bank: ReferenceBank, k: int = DEFAULT_K) -> np.ndarray:
    """Cosine distance (1 - similarity, 0 to 2) from each embedding to the mean of its k nearest
    references' similarities: 0 for an image the bank holds k times, larger the further away it is."""
    queries = np.asarray(embeddings, dtype=np.float32)
    if queries.ndim == 1:
        queries = queries[None]
    if queries.shape[1] != bank.dim:
        raise BankError(
            f"Embeddings of dimension {queries.shape[1]} cannot be compared with a bank of {bank.dim}."
        )
    return novelty_from_similarities(bank.index.similarities(unit_rows(queries)), k)


def novelty_from_similarities(similarity: np.ndarray, k: int) -> np.ndarray:
    """`novelty` from each query's similarities to every reference (N x M)."""
    if not 1 <= k <= similarity.shape[1]:
        raise BankError(f"k must be between 1 and the bank's {similarity.shape[1]} rows, got {k}.")
    # Summed in float64 in ascending order: the same k values give the same novelty to the bit, however
    # they were found (`open_set.NoveltyGate.verdict_likeness` finds them with one partition).
    return 1.0 - np.add.reduce(np.sort(top_k(similarity, k), axis=1), axis=1, dtype=np.float64) / k


def left_out_novelty(
    bank: ReferenceBank, groups: np.ndarray, k: int = DEFAULT_K, chunk: int = 1024
) -> np.ndarray:
    """Each bank row's `novelty` against the bank's rows of other groups (one code a row: its case, else
    its product, else its file), as a validation image meets a bank without its own case. Infinite for
    a row with fewer than k rows outside its group. Computed `chunk` rows at a time."""
    groups = np.asarray(groups)
    if groups.shape != (len(bank),):
        raise BankError(f"{len(bank)} bank rows need as many group codes, got {groups.shape}.")
    index, out = bank.index, []
    for start in range(0, len(bank), chunk):
        rows = slice(start, min(start + chunk, len(bank)))
        similarity = index.similarities(index.references[rows])
        similarity[groups[rows, None] == groups[None, :]] = -np.inf  # itself and its case-mates
        out.append(novelty_from_similarities(similarity, min(k, len(bank))))
    return np.concatenate(out) if out else np.zeros(0)
