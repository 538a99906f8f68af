"""Content hashes for ingestion: sha256 for exact duplicates, a difference hash for near-duplicates.

The difference hash (dHash, 64 bits) is computed on the model's own view of the image (the preprocessed
CxSxS input), so two files the model would see alike hash alike whatever their format or size.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import numpy as np
from PIL import Image

HASH_BITS = 64
_BIT_WEIGHTS = (np.uint64(1) << np.arange(HASH_BITS, dtype=np.uint64)).astype(np.uint64)


def sha256_hex(data: bytes) -> str:
    """The sha256 of the file's bytes, hex encoded."""
    return hashlib.sha256(data).hexdigest()


def _trim(grey: np.ndarray, value: float) -> np.ndarray:
    """Crops border rows and columns that are entirely `value` (letterbox padding, air around a parcel)."""
    rows = np.flatnonzero(~np.all(grey == value, axis=1))
    cols = np.flatnonzero(~np.all(grey == value, axis=0))
    if rows.size == 0 or cols.size == 0:
        return grey
    return grey[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def dhash(model_input: np.ndarray, trim_value: float | None = None) -> int:
    """64-bit difference hash of a CxHxW (or HxW) float image: is each of 8x8 cells brighter than its right
    neighbour. Robust to re-encoding, resizing and small brightness changes; not to crops or rotations.

    `trim_value` crops uniform borders of that value first: X-ray inputs are letterboxed with air (1.0),
    and hashing the padding would make every scan of the same aspect ratio look alike."""
    grey = model_input.mean(axis=0) if model_input.ndim == 3 else model_input
    if trim_value is not None:
        grey = _trim(grey, trim_value)
    plane = Image.fromarray(np.ascontiguousarray(grey, dtype=np.float32), "F")
    small = plane.resize((9, 8), Image.Resampling.BOX)
    cells = np.asarray(small, dtype=np.float32)
    bits = (cells[:, 1:] > cells[:, :-1]).reshape(-1)
    return int((bits.astype(np.uint64) * _BIT_WEIGHTS).sum(dtype=np.uint64))


def hamming(a: int, b: int) -> int:
    """Number of differing bits between two hashes."""
    return (a ^ b).bit_count()


def near_duplicate_pairs(
    hashes: np.ndarray, threshold: int, chunk: int = 256
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (i, j, distance) arrays for every pair i < j whose hashes differ in at most `threshold` bits.

    Exact all-pairs search in chunks of rows: 50,000 hashes take a few seconds and `chunk` x N x 8 bytes of
    memory, with no index that could miss a pair.
    """
    hashes = np.asarray(hashes, dtype=np.uint64)
    count = len(hashes)
    for start in range(0, count, chunk):
        block = hashes[start : start + chunk]
        # only compare with later rows, so each pair appears once
        later = hashes[start:]
        distances = np.bitwise_count(block[:, None] ^ later[None, :])
        rows, cols = np.nonzero(distances <= threshold)
        i = rows + start
        j = cols + start
        keep = j > i
        if keep.any():
            yield i[keep], j[keep], distances[rows[keep], cols[keep]].astype(np.int64)


class UnionFind:
    """Disjoint sets over 0..n-1, to gather near-duplicate pairs into groups."""

    def __init__(self, size: int) -> None:
        self.parent = list(range(size))

    def find(self, item: int) -> int:
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:  # path compression
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: int, b: int) -> None:
        root_a, root_b = self.find(a), self.find(b)
        if root_a != root_b:
            self.parent[max(root_a, root_b)] = min(root_a, root_b)
