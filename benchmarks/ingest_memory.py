"""Peak memory and throughput of `verity data ingest` over many small images.

Generates N tiny PNGs (default 20,000) in a temporary folder tree (genuine/ and counterfeit/, in case
folders), runs the ingest in a subprocess, and prints the subprocess's peak RSS and images per second.
The acceptance bar is a peak under 1 GB; the exit code is 1 when it is exceeded or the ingest fails.

    .venv/bin/python benchmarks/ingest_memory.py [--n 20000] [--size 32] [--workers 2] [--keep DIR]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

LIMIT_BYTES = 1024**3


def generate(root: Path, count: int, size: int, seed: int = 0) -> None:
    """count distinct PNGs of size x size, 50 per case folder, alternating labels by case."""
    rng = np.random.default_rng(seed)
    for index in range(count):
        case = index // 50
        label = "counterfeit" if case % 2 else "genuine"
        folder = root / label / f"case{case:05d}"
        if index % 50 == 0:
            folder.mkdir(parents=True, exist_ok=True)
        blocks = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)  # enough detail for distinct dHashes
        Image.fromarray(blocks).resize((size, size), Image.Resampling.BILINEAR).save(
            folder / f"{index:06d}.png"
        )


def run_ingest(src: Path, manifest: Path, workers: int) -> tuple[int, float, int]:
    """Runs the ingest in a child process; returns (exit code, seconds, peak RSS bytes of the child)."""
    command = [
        sys.executable,
        "-m",
        "verity.datasets.cli",
        "ingest",
        str(src),
        "--out",
        str(manifest),
        "--modality",
        "photo",
        "--case-from-folder",
        "--workers",
        str(workers),
    ]
    start = time.perf_counter()
    # stderr (the progress bar) passes through so a person watching sees it move.
    completed = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    print(completed.stdout)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux, largest child
    return completed.returncode, seconds, peak_kib * 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20_000, help="number of images (default 20000)")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--workers", type=int, default=2, help="ingest decoding threads (default 2)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="verity-ingest-bench-") as temporary:
        root = args.keep or Path(temporary)
        src = root / "images"
        started = time.perf_counter()
        generate(src, args.n, args.size)
        print(
            f"generated {args.n:,} PNGs of {args.size} px in {time.perf_counter() - started:.1f} s",
            flush=True,
        )
        code, seconds, peak = run_ingest(src, root / "manifest.jsonl", args.workers)
    verdict = "OK" if code == 0 and peak < LIMIT_BYTES else "FAIL"
    print(
        f"ingest: exit {code}, {args.n:,} images in {seconds:.1f} s = {args.n / seconds:,.0f} images/s, "
        f"peak RSS {peak / 1024**2:,.0f} MiB (limit {LIMIT_BYTES / 1024**2:,.0f} MiB): {verdict}"
    )
    return 0 if verdict == "OK" else 1


if __name__ == "__main__":
    sys.exit(main())
