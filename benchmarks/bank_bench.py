"""Query time of the training bank's brute-force cosine kNN (inference/bank.py) at 10,000 and 100,000
references of the shipped models' embedding width (D = 144), for one image and for a batch of 8, with k = 5.

Random unit vectors stand in for embeddings: brute force costs the same whatever the values. Times are
wall-clock medians of repeated `novelty` calls on one BLAS thread, as a server scoring with one intra-op
thread per session would run them (OPENBLAS_NUM_THREADS=2 in the environment measures two); the bank's
load time, its file size and the float32 search matrix it holds are printed too.

    .venv/bin/python benchmarks/bank_bench.py [--sizes 10000 100000] [--dim 144]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # read once, when numpy loads its BLAS
import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from verity.inference.bank import DEFAULT_K, build_bank, load_bank, novelty, save_bank  # noqa: E402


def random_units(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows in float16, made in chunks so 100,000 x D never exists in float64."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, count, 10_000):
        rows = rng.standard_normal((min(10_000, count - start), dim), dtype=np.float32)
        chunks.append((rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float16))
    return np.concatenate(chunks)


def median_ms(function: Any, repeats: int) -> float:
    function()  # the first call builds the float32 search matrix
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def measure(size: int, dim: int, repeats: int) -> dict[str, Any]:
    embeddings = random_units(size, dim, seed=size)
    with tempfile.TemporaryDirectory(prefix="verity-bank-") as work:
        bank = build_bank(embeddings, ["genuine"] * size, max_references=size)
        path = save_bank(bank, Path(work) / "bank.npz")
        started = time.perf_counter()
        bank = load_bank(path)
        load_ms = (time.perf_counter() - started) * 1000
        file_mb = path.stat().st_size / 1e6
    queries = random_units(8, dim, seed=1).astype(np.float32)
    row: dict[str, Any] = {"references": size, "dim": dim, "k": DEFAULT_K, "file_mb": round(file_mb, 1),
                           "load_ms": round(load_ms, 1), "blas_threads": os.environ["OPENBLAS_NUM_THREADS"]}
    row["query_1_ms"] = round(median_ms(lambda: novelty(queries[:1], bank), repeats), 2)
    row["query_8_ms"] = round(median_ms(lambda: novelty(queries, bank), repeats), 2)
    row["search_matrix_mb"] = round(bank.index.references.nbytes / 1e6, 1)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=144)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    for size in args.sizes:
        print(json.dumps(measure(size, args.dim, args.repeats)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
