"""`verity data synth`: deterministic synthetic photos and X-rays with a manifest.

Shared machinery for datasets/synth_photo.py and datasets/synth_xray.py:

- Images come in cases (shipments) of 2-6 images of one product. Cases come in pairs of equal size, one
  genuine and one counterfeit in a seeded order, so labels are balanced and no case mixes labels.
- Every random draw comes from a generator seeded by (seed, case) for what a shipment shares (product,
  the counterfeit's cues and how they look) or by (seed, index) for what each photo or scan has of its own
  (pose, lighting, noise). Image i is therefore the same whatever n is and whichever worker renders it.
- The split is grouped by case_id and stratified by label (datasets.split), 70/15/15.
- Nuisance variation (background, lighting, noise, JPEG quality, scene type, image size) is drawn the same
  way for both labels, so the only difference a model can learn is the counterfeit cue itself.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import struct
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from verity.datasets.manifest import ManifestRow, write_manifest
from verity.datasets.split import assign_groups, split_fractions
from verity.inference.vocabulary import DEFAULT_TEST_FRACTION, DEFAULT_VAL_FRACTION, LABELS, MODALITIES

MIN_CASE, MAX_CASE = 2, 6
MAX_SIZE = 4096


@dataclass(frozen=True)
class Difficulty:
    """How strong the counterfeit cues are (1 = blatant) and how much nuisance variation there is."""

    name: str
    strength: float  # X-ray cue strength
    nuisance: float
    # Photo cues are small, local print defects that an ImageNet backbone finds harder than the X-ray
    # cues (densities, missing parts), so photos get their own scale for the same named difficulty.
    photo_strength: float = 1.0


DIFFICULTIES: dict[str, Difficulty] = {
    "easy": Difficulty("easy", strength=1.0, nuisance=0.6, photo_strength=1.0),
    "medium": Difficulty("medium", strength=0.55, nuisance=1.0, photo_strength=0.8),
    "hard": Difficulty("hard", strength=0.25, nuisance=1.35, photo_strength=0.3),
}

# Streams keep the (seed, index) generators of different purposes independent of each other. The export
# stream (an image's console style and crop) is its own, so choosing a style never moves the scene's draws:
# image i shows the same parcel in every style, and png16 stays byte-identical to before styles existed.
STREAM_PAIR, STREAM_CASE, STREAM_IMAGE, STREAM_EXPORT = 1, 2, 3, 4

# How an X-ray leaves the console (datasets.synth_xray explains each); `mixed` draws one per image, with a
# crop. The first is the default.
EXPORT_STYLES = ("png16", "grey8-png", "grey8-jpeg", "rgb-grey-jpeg", "pseudo-colour", "mixed")


def rng_for(seed: int, number: int, stream: int) -> np.random.Generator:
    """A generator that depends only on (seed, number, stream)."""
    return np.random.default_rng(np.random.SeedSequence([seed & 0xFFFFFFFF, number, stream]))


@dataclass(frozen=True)
class CaseInfo:
    """What all images of one case (shipment) share."""

    number: int
    label: str
    product: str
    cues: tuple[str, ...] = ()


@dataclass(frozen=True)
class ImageJob:
    """Everything needed to render image `index`; picklable, so a worker pool can take it."""

    index: int
    seed: int
    case: CaseInfo
    difficulty: Difficulty
    size: int
    dual_energy: bool = False
    export_style: str = EXPORT_STYLES[0]
    crops: bool = False  # crop each scan to a drawn size and aspect (always on for `mixed`)


class Generator(Protocol):
    """What a modality module offers to the shared driver."""

    CUES: tuple[str, ...]
    PRODUCTS: tuple[str, ...]

    def cues_for(self, product: str) -> tuple[str, ...]: ...

    def render(self, job: ImageJob) -> tuple[bytes, str, dict]: ...

    def preview_tile(self, data: bytes, tile: int) -> np.ndarray: ...


def generator_for(modality: str) -> Generator:
    """The generator module of a modality."""
    if modality not in MODALITIES:
        raise ValueError(f"Invalid modality {modality!r}. Only {', '.join(MODALITIES)} are supported.")
    import importlib

    return importlib.import_module(f"verity.datasets.synth_{modality}")  # type: ignore[return-value]


@dataclass
class CuePolicy:
    """Which cues counterfeits may carry, and the products that can show at least one of them."""

    allowed: tuple[str, ...]
    products: tuple[str, ...]
    per_product: dict[str, tuple[str, ...]] = field(default_factory=dict)


def cue_policy(generator: Generator, holdout: Sequence[str] = (), only: Sequence[str] = ()) -> CuePolicy:
    """Resolves --holdout-cues / --only-cues; raises ValueError naming the valid cues."""
    for name in [*holdout, *only]:
        if name not in generator.CUES:
            raise ValueError(f"Unknown cue {name!r}. Valid cues: {', '.join(generator.CUES)}.")
    allowed = tuple(c for c in generator.CUES if (not only or c in only) and c not in holdout)
    if not allowed:
        raise ValueError("No counterfeit cue is left once --holdout-cues and --only-cues are applied.")
    per_product = {p: tuple(c for c in generator.cues_for(p) if c in allowed) for p in generator.PRODUCTS}
    # Genuine cases draw from the same product pool as counterfeit ones, so the product never gives the
    # label away.
    products = tuple(p for p in generator.PRODUCTS if per_product[p])
    return CuePolicy(allowed, products, per_product)


# Cues no image model can see (a wrong check digit reads only with a barcode scanner): never the only
# cue of a counterfeit when a visible one is allowed, so a label never rests on an invisible difference.
INVISIBLE_CUES = frozenset({"barcode_check"})


def _draw_cues(rng: np.random.Generator, available: tuple[str, ...]) -> tuple[str, ...]:
    count = int(rng.integers(1, min(3, len(available)) + 1))
    picked = [available[i] for i in rng.choice(len(available), size=count, replace=False)]
    visible = [c for c in available if c not in INVISIBLE_CUES and c not in picked]
    if all(c in INVISIBLE_CUES for c in picked) and visible:
        picked.append(visible[int(rng.integers(len(visible)))])
    return tuple(sorted(picked))


def plan_cases(seed: int, n: int, policy: CuePolicy) -> list[CaseInfo]:
    """The case of each image index 0..n-1 (a list of length n)."""
    per_index: list[CaseInfo] = []
    pair = 0
    while len(per_index) < n:
        pair_rng = rng_for(seed, pair, STREAM_PAIR)
        size = int(pair_rng.integers(MIN_CASE, MAX_CASE + 1))
        labels = LABELS if pair_rng.random() < 0.5 else LABELS[::-1]
        for offset, label in enumerate(labels):
            number = 2 * pair + offset
            case_rng = rng_for(seed, number, STREAM_CASE)
            product = policy.products[int(case_rng.integers(len(policy.products)))]
            cues = _draw_cues(case_rng, policy.per_product[product]) if label == "counterfeit" else ()
            per_index.extend([CaseInfo(number, label, product, cues)] * size)
        pair += 1
    return per_index[:n]


def case_rng(job: ImageJob) -> np.random.Generator:
    """Draws shared by every image of the job's case (a fresh generator each call, same sequence)."""
    return rng_for(job.seed, job.case.number, STREAM_CASE + 10)


def image_rng(job: ImageJob) -> np.random.Generator:
    """Draws of this image alone."""
    return rng_for(job.seed, job.index, STREAM_IMAGE)


def case_id(modality: str, seed: int, number: int) -> str:
    return f"{modality}-s{seed}-c{number:06d}"


def _render_one(args: tuple[str, ImageJob]) -> tuple[int, bytes, str, dict]:
    modality, job = args
    data, suffix, meta = generator_for(modality).render(job)
    return job.index, data, suffix, meta


def _iter_rendered(
    modality: str, jobs: list[ImageJob], workers: int
) -> Iterator[tuple[int, bytes, str, dict]]:
    if workers <= 1:
        for job in jobs:
            yield _render_one((modality, job))
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_render_one, [(modality, job) for job in jobs], chunksize=8)


def generate(
    modality: str,
    n: int,
    out: str | Path,
    seed: int = 0,
    difficulty: str = "medium",
    size: int = 256,
    holdout_cues: Sequence[str] = (),
    only_cues: Sequence[str] = (),
    dual_energy: bool = False,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
    export_style: str | None = None,
    crops: bool = False,
) -> list[ManifestRow]:
    """Renders n images into out/images and writes out/manifest.jsonl; returns the rows.

    `export_style` (X-ray only, one of EXPORT_STYLES; None: png16) is the form each scan is written in;
    `crops` crops scans to a drawn size and aspect around the goods (`mixed` always does; one in five
    crops is the whole scan).
    """
    if n < 1:
        raise ValueError(f"--n must be at least 1, not {n}.")
    if not 32 <= size <= MAX_SIZE:
        raise ValueError(f"--size must lie between 32 and {MAX_SIZE} pixels, not {size}.")
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"Invalid difficulty {difficulty!r}. Only {', '.join(DIFFICULTIES)} are supported.")
    _check_xray_options(modality, dual_energy, export_style, crops)
    generator = generator_for(modality)
    policy = cue_policy(generator, holdout_cues, only_cues)
    cases = plan_cases(seed, n, policy)
    level = DIFFICULTIES[difficulty]
    style = export_style or EXPORT_STYLES[0]
    jobs = [ImageJob(i, seed, cases[i], level, size, dual_energy, style, crops) for i in range(n)]
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows: list[ManifestRow] = []
    for done, (index, data, suffix, meta) in enumerate(_iter_rendered(modality, jobs, workers), start=1):
        case = cases[index]
        relative = f"images/{case.label}/{modality}_{seed}_{index:06d}{suffix}"
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        (out / relative).write_bytes(data)
        rows.append(
            ManifestRow(
                path=relative,
                label=case.label,
                modality=modality,
                product=case.product,
                case_id=case_id(modality, seed, case.number),
                source="synthetic",
                sha256=hashlib.sha256(data).hexdigest(),
                meta={"cues": list(case.cues), "difficulty": difficulty, "index": index, **meta},
            )
        )
        if progress:
            progress(done, n)
    rows = assign_splits(rows, seed)
    write_manifest(out / "manifest.jsonl", rows)
    return rows


def _check_xray_options(modality: str, dual_energy: bool, export_style: str | None, crops: bool) -> None:
    """Raises ValueError for X-ray-only options on photos and for an unknown style, naming the valid ones."""
    for name, given in (("--dual-energy", dual_energy), ("--export-style", export_style), ("--crops", crops)):
        if given and modality != "xray":
            raise ValueError(f"{name} applies to --modality xray only.")
    if export_style is not None and export_style not in EXPORT_STYLES:
        raise ValueError(f"Unknown export style {export_style!r}. Valid styles: {', '.join(EXPORT_STYLES)}.")


def assign_splits(rows: list[ManifestRow], seed: int) -> list[ManifestRow]:
    """Train/val/test at the default fractions (70/15/15), grouped by case_id and stratified by label,
    reproducible by seed."""
    from dataclasses import replace

    groups: dict[str, Counter] = {}
    for row in rows:
        groups.setdefault(str(row.case_id), Counter())[row.label] += 1
    assignment = assign_groups(groups, split_fractions(DEFAULT_VAL_FRACTION, DEFAULT_TEST_FRACTION), seed)
    return [replace(row, split=assignment[str(row.case_id)]) for row in rows]


# ------------------------------------------------------------------------------------------- preview


def write_preview(
    modality: str, out: str | Path, rows: list[ManifestRow], path: str | Path, per_label: int = 6
) -> None:
    """A grid: genuine samples on the top rows, counterfeits below, each tile captioned."""
    from PIL import Image, ImageDraw, ImageFont

    generator = generator_for(modality)
    tile, caption = 200, 44
    picks: dict[str, list[ManifestRow]] = {label: [] for label in LABELS}
    seen: set[str | None] = set()
    for row in rows:  # one image per case, so the grid shows different products and cues
        if row.case_id not in seen and len(picks[row.label]) < per_label:
            seen.add(row.case_id)
            picks[row.label].append(row)
    columns = max(1, max(len(v) for v in picks.values()))
    grid = Image.new("RGB", (columns * tile, 2 * (tile + caption) + 24), "white")
    draw = ImageDraw.Draw(grid)
    font = ImageFont.load_default(size=12)
    draw.text((4, 4), f"{modality}: genuine (top) vs counterfeit (bottom)", fill="black", font=font)
    for row_number, label in enumerate(LABELS):
        top = 24 + row_number * (tile + caption)
        for column, row in enumerate(picks[label]):
            data = (Path(out) / row.path).read_bytes()
            image = Image.fromarray(generator.preview_tile(data, tile))
            grid.paste(image, (column * tile, top))
            cues = (row.meta or {}).get("cues", []) or ["-"]
            text = f"{label} {row.product}\n" + "\n".join(
                ", ".join(cues[k : k + 2]) for k in range(0, len(cues), 2)
            )
            draw.multiline_text((column * tile + 3, top + tile + 1), text, fill="black", font=font, spacing=1)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


# ----------------------------------------------------------------------------------------------- CLI


def _cue_list(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="verity data synth", description="Generate a synthetic photo or X-ray set with a manifest."
    )
    parser.add_argument("--modality", required=True, choices=MODALITIES)
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--difficulty", default="medium", choices=tuple(DIFFICULTIES))
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/ and manifest.jsonl)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=256, help="long side in pixels (default 256, max 4096)")
    cues = "; ".join(f"{m}: {', '.join(generator_for(m).CUES)}" for m in MODALITIES)
    parser.add_argument(
        "--holdout-cues",
        type=_cue_list,
        default=[],
        help=f"comma-separated cues counterfeits never carry ({cues})",
    )
    parser.add_argument(
        "--only-cues", type=_cue_list, default=[], help="comma-separated: the only cues counterfeits carry"
    )
    parser.add_argument("--preview", type=Path, help="also write a genuine-vs-counterfeit grid PNG here")
    parser.add_argument("--dual-energy", action="store_true", help="X-ray: 2-page 16-bit TIFF (high, low)")
    # Validated by generate(), not argparse choices, so a wrong name gets our one-line message and exit 2.
    parser.add_argument(
        "--export-style",
        metavar="STYLE",
        help=f"X-ray: the form a console exports ({', '.join(EXPORT_STYLES)}; default {EXPORT_STYLES[0]}). "
        "mixed draws one per image and crops it",
    )
    parser.add_argument(
        "--crops", action="store_true", help="X-ray: crop each scan to a drawn size and aspect near the goods"
    )
    parser.add_argument("--workers", type=int, default=1, help="processes to render with (default 1)")
    return parser


def synth_main(argv: list[str]) -> int:
    """`verity data synth ...`; returns an exit code (2 for bad options)."""
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("verity data synth: --workers must be at least 1.", file=sys.stderr)
        return 2
    show = sys.stderr.isatty()

    def progress(done: int, total: int) -> None:
        if show and (done == total or done % 50 == 0):
            print(
                f"\rsynth {args.modality}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr
            )

    try:
        rows = generate(
            args.modality,
            args.n,
            args.out,
            seed=args.seed,
            difficulty=args.difficulty,
            size=args.size,
            holdout_cues=args.holdout_cues,
            only_cues=args.only_cues,
            dual_energy=args.dual_energy,
            workers=min(args.workers, os.cpu_count() or 1),
            progress=progress,
            export_style=args.export_style,
            crops=args.crops,
        )
    except ValueError as error:
        print(f"verity data synth: {error}", file=sys.stderr)
        return 2
    if args.preview:
        write_preview(args.modality, args.out, rows, args.preview)
    counts = Counter((row.split, row.label) for row in rows)
    summary = ", ".join(
        f"{s}: {counts[(s, 'genuine')]}/{counts[(s, 'counterfeit')]}" for s in ("train", "val", "test")
    )
    print(
        f"wrote {len(rows)} {args.modality} images to {args.out} (genuine/counterfeit per split: {summary})"
    )
    return 0


def encode_png16(array: np.ndarray) -> bytes:
    """A single-channel 16-bit PNG, written directly (PIL's 16-bit path is ~20x slower).

    Noisy 16-bit scans barely compress, so small images are stored uncompressed (zlib level 0) to keep
    generation fast; large ones get level 1.
    """
    height, width = array.shape
    raw = np.zeros((height, 1 + 2 * width), dtype=np.uint8)  # filter byte 0 (none) per row
    raw[:, 1:] = np.ascontiguousarray(array, dtype=">u2").view(np.uint8).reshape(height, 2 * width)
    level = 0 if height * width <= 1 << 20 else 1

    def chunk(kind: bytes, payload: bytes) -> bytes:
        return (
            struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(raw.tobytes(), level))
        + chunk(b"IEND", b"")
    )
