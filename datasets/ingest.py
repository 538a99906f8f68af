"""`verity data ingest SRC --out MANIFEST`: turn a seizure's images into manifest rows training can trust.

SRC is a folder tree (labels from folder names), a CSV or a JSONL (columns path, label and optionally
modality, product, case_id, source). Every file is validated by the serving decoder (so training never
sees an image the service cannot read); exact duplicates are dropped, near-duplicates flagged, and rows
get group-aware, label-stratified splits. Appending to an existing manifest never moves existing rows.

Streams: files are read, hashed and decoded one at a time (a few in flight across threads); only a small
record per accepted row is kept, so 50,000 images fit in a few hundred MB.

The report (JSONL) lists every rejected file and why, every dropped duplicate with the copy kept, and
every near-duplicate group; nothing is dropped silently.
"""

from __future__ import annotations

import contextlib
import json
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from verity.datasets.hashing import UnionFind, dhash, near_duplicate_pairs, sha256_hex
from verity.datasets.ingest_sources import Candidate, count_items, iter_source
from verity.datasets.manifest import ManifestRow, read_manifest, write_manifest
from verity.datasets.progress import progress_bar
from verity.datasets.split import assign_groups, group_key, split_fractions
from verity.inference.decode import read_image_bytes
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeError
from verity.inference.preprocess import load_for_model
from verity.inference.private_files import PUBLIC_FILE_MODE, staged_file
from verity.inference.spec import default_spec
from verity.inference.vocabulary import (
    DEFAULT_SPLIT_SEED,
    DEFAULT_TEST_FRACTION,
    DEFAULT_VAL_FRACTION,
    LABELS,
    SPLITS,
)


@dataclass(frozen=True)
class IngestOptions:
    modality: str | None = None
    seed: int = DEFAULT_SPLIT_SEED
    val: float = DEFAULT_VAL_FRACTION
    test: float = DEFAULT_TEST_FRACTION
    report: Path | None = None
    near_threshold: int = 4  # bits of 64: re-encodes and resizes stay within 2-3
    workers: int = 2
    overwrite: bool = False
    source: str | None = None
    progress: bool = True
    # Use the folders between SRC and the file (other than label/modality names) as the case_id.
    case_from_folder: bool = False


@dataclass
class Inspection:
    candidate: Candidate
    sha256: str | None = None
    dhash: int | None = None
    problem: tuple[str, str] | None = None


@dataclass
class IngestResult:
    manifest: Path
    report: Path
    seen: int = 0
    accepted: int = 0
    existing: int = 0
    rejected: Counter = field(default_factory=Counter)
    rejected_examples: dict[str, str] = field(default_factory=dict)
    duplicates: int = 0
    label_conflicts: int = 0
    near_groups: int = 0
    near_warnings: Counter = field(default_factory=Counter)
    hidden_skipped: int = 0
    split_counts: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})


# ------------------------------------------------------------------------------------------- inspect


def inspect(candidate: Candidate) -> Inspection:
    """Reads, hashes and decodes one file as the server would (default limits, model preprocessing)."""
    if candidate.problem:
        return Inspection(candidate, problem=candidate.problem)
    try:
        data = read_image_bytes(candidate.path, DEFAULT_LIMITS)
    except DecodeError as error:
        return Inspection(candidate, problem=(error.code, str(error)))
    except OSError as error:
        return Inspection(
            candidate, problem=("unreadable", f"cannot read the file: {error.strerror or error}")
        )
    sha = sha256_hex(data)
    spec = default_spec(candidate.modality or "photo")
    try:
        model_input = load_for_model(data, spec, DEFAULT_LIMITS)
    except DecodeError as error:
        return Inspection(candidate, sha256=sha, problem=(error.code, str(error)))
    except Exception as error:  # a decoder failure we did not foresee must still be reported, not crash
        return Inspection(
            candidate, sha256=sha, problem=("decoder_failure", f"{type(error).__name__}: {error}")
        )
    # X-ray inputs are letterboxed with air (1.0): hash the scan, not the padding.
    trim = 1.0 if spec.resize_mode == "letterbox" and spec.modality == "xray" else None
    return Inspection(candidate, sha256=sha, dhash=dhash(model_input, trim_value=trim))


def bounded_map(function: Callable[[Any], Any], items: Iterable[Any], workers: int) -> Iterator[Any]:
    """map() across threads, in order, with at most a few items in flight (memory stays flat).

    Threads suffice: Pillow, hashlib and numpy release the GIL while they decode, hash and resize.
    """
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= 4 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


# ------------------------------------------------------------------------------------------ existing


@dataclass
class Existing:
    """What an existing manifest contributes: never rewritten, only consulted."""

    rows: int = 0
    sha_to_path: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha -> (path, label)
    group_split: dict[str, str] = field(default_factory=dict)
    counts: dict[str, Counter] = field(default_factory=lambda: {s: Counter() for s in SPLITS})
    hashed: list[tuple[int, str, str, str | None]] = field(default_factory=list)  # dhash, path, label, split


def load_existing(manifest: Path) -> Existing:
    existing = Existing()
    for row in read_manifest(manifest):
        existing.rows += 1
        if row.sha256:
            existing.sha_to_path.setdefault(row.sha256, (row.path, row.label))
        if row.split:
            existing.group_split.setdefault(group_key(row), row.split)
            existing.counts[row.split][row.label] += 1
        stored_hash = row.meta.get("dhash") if row.meta else None
        if isinstance(stored_hash, str) and len(stored_hash) == 16:
            # a hand-edited, unreadable hash just leaves that row out of the near-duplicate check
            with contextlib.suppress(ValueError):
                existing.hashed.append((int(stored_hash, 16), row.path, row.label, row.split))
    return existing


# --------------------------------------------------------------------------------------------- ingest


def manifest_path(image: Path, manifest: Path) -> str:
    """Relative to the manifest's folder when the image lies below it, else absolute."""
    resolved = image.resolve()
    try:
        return resolved.relative_to(manifest.resolve().parent).as_posix()
    except ValueError:
        return str(resolved)


def _write(report: TextIO, record: dict[str, Any]) -> None:
    report.write(json.dumps(record, sort_keys=False) + "\n")




def _collect(
    inspections: Iterable[Inspection],
    out: Path,
    existing: Existing,
    report: TextIO,
    result: IngestResult,
    bar: Any,
) -> list[tuple[ManifestRow, int]]:
    """Sorts inspections into rejected, duplicate and accepted; writes the first two to the report."""
    seen_sha = dict(existing.sha_to_path)
    accepted: list[tuple[ManifestRow, int]] = []
    for inspection in inspections:
        bar.update(1)
        result.seen += 1
        candidate = inspection.candidate
        if inspection.problem:
            code, reason = inspection.problem
            result.rejected[code] += 1
            result.rejected_examples.setdefault(code, f"{candidate.shown}: {reason}")
            _write(report, {"kind": "rejected", "path": candidate.shown, "code": code, "reason": reason})
            continue
        assert inspection.sha256 is not None and inspection.dhash is not None
        path = manifest_path(candidate.path, out)
        if inspection.sha256 in seen_sha:
            kept, kept_label = seen_sha[inspection.sha256]
            conflict = kept_label != candidate.label
            result.duplicates += 1
            result.label_conflicts += conflict
            _write(
                report,
                {
                    "kind": "duplicate",
                    "path": candidate.shown,
                    "kept": kept,
                    "sha256": inspection.sha256,
                    "label": candidate.label,
                    "kept_label": kept_label,
                    "label_conflict": conflict,
                },
            )
            continue
        seen_sha[inspection.sha256] = (path, str(candidate.label))
        meta = {**(candidate.meta or {}), "dhash": f"{inspection.dhash:016x}"}
        row = ManifestRow(
            path=path,
            label=str(candidate.label),
            modality=str(candidate.modality),
            product=candidate.product,
            case_id=candidate.case_id,
            source=candidate.source,
            sha256=inspection.sha256,
            meta=meta,
        )
        accepted.append((row, inspection.dhash))
    return accepted


def _assign_splits(rows: list[ManifestRow], existing: Existing, options: IngestOptions) -> list[ManifestRow]:
    """New rows of a known group join its split; new groups are placed by `assign_groups`."""
    new_groups: dict[str, Counter] = {}
    for row in rows:
        key = group_key(row)
        if key not in existing.group_split:
            new_groups.setdefault(key, Counter())[row.label] += 1
    fractions = split_fractions(options.val, options.test)
    placed = assign_groups(new_groups, fractions, options.seed, existing.counts)
    return [
        replace(row, split=existing.group_split.get(group_key(row)) or placed[group_key(row)]) for row in rows
    ]


def _near_duplicates(
    rows: list[ManifestRow],
    hashes: list[int],
    existing: Existing,
    options: IngestOptions,
    report: TextIO,
    result: IngestResult,
) -> None:
    """Groups near-identical images (chains of pairs within the threshold) that include a new row."""
    members = [(h, path, label, split) for h, path, label, split in existing.hashed]
    first_new = len(members)
    members += [(h, row.path, row.label, row.split) for h, row in zip(hashes, rows, strict=True)]
    if len(members) < 2:
        return
    values = np.array([m[0] for m in members], dtype=np.uint64)
    sets = UnionFind(len(members))
    worst: dict[int, int] = {}
    for i, j, distance in near_duplicate_pairs(values, options.near_threshold):
        for a, b, d in zip(i.tolist(), j.tolist(), distance.tolist(), strict=True):
            sets.union(a, b)
            worst[a] = max(worst.get(a, 0), d)
    groups: dict[int, list[int]] = {}
    for index in worst:
        groups.setdefault(sets.find(index), [])
    for index in range(len(members)):
        root = sets.find(index)
        if root in groups:
            groups[root].append(index)
    for indices in groups.values():
        if len(indices) < 2 or max(indices) < first_new:
            continue  # only existing rows: reported when they were ingested
        labels = {members[i][2] for i in indices}
        splits = {members[i][3] for i in indices}
        cross_label, cross_split = len(labels) > 1, len(splits) > 1
        result.near_groups += 1
        if cross_label:
            result.near_warnings["cross_label"] += 1
        if cross_split:
            result.near_warnings["cross_split"] += 1
        _write(
            report,
            {
                "kind": "near_duplicate",
                "severity": "warning" if cross_label or cross_split else "info",
                "cross_label": cross_label,
                "cross_split": cross_split,
                "max_distance": max(worst.get(i, 0) for i in indices),
                "members": [
                    {
                        "path": members[i][1],
                        "label": members[i][2],
                        "split": members[i][3],
                        "new": i >= first_new,
                    }
                    for i in indices
                ],
            },
        )


def ingest(src: Path, out: Path, options: IngestOptions) -> IngestResult:
    """Runs the whole ingestion and returns its figures; the report and manifest are written."""
    split_fractions(options.val, options.test)  # fail before reading anything
    append = out.exists() and not options.overwrite
    existing = load_existing(out) if append else Existing()
    report_path = options.report or out.with_name(out.stem + ".report.jsonl")
    result = IngestResult(manifest=out, report=report_path, existing=existing.rows)
    options = replace(options, source=options.source or src.resolve().name)
    hidden = [0]
    own_files = frozenset(path.resolve() for path in (out, report_path))
    candidates = iter_source(src, options, hidden, own_files)
    bar = progress_bar(options.progress, total=count_items(src), unit="img", desc="ingest")
    report_path.parent.mkdir(parents=True, exist_ok=True)
    with open(report_path, "w", encoding="utf-8") as report:
        try:
            accepted = _collect(
                bounded_map(inspect, candidates, options.workers), out, existing, report, result, bar
            )
        finally:
            bar.close()
        rows = _assign_splits([row for row, _ in accepted], existing, options)
        _near_duplicates(rows, [h for _, h in accepted], existing, options, report, result)
        result.hidden_skipped = hidden[0]
        result.accepted = len(rows)
        for row in rows:
            result.split_counts[str(row.split)][row.label] += 1
        _write(report, {"kind": "summary", **summary_dict(result)})
    _write_rows(out, rows, append)
    return result


def _write_rows(out: Path, rows: list[ManifestRow], append: bool) -> None:
    if append:
        write_manifest(out, rows, append=True)
        return
    # A new manifest appears whole or not at all.
    out.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(out, PUBLIC_FILE_MODE) as staged:
        write_manifest(staged.path, rows)
        staged.publish()


def summary_dict(result: IngestResult) -> dict[str, Any]:
    return {
        "seen": result.seen,
        "accepted": result.accepted,
        "existing_rows": result.existing,
        "rejected": dict(result.rejected),
        "duplicates": result.duplicates,
        "label_conflicts": result.label_conflicts,
        "near_duplicate_groups": result.near_groups,
        "near_duplicate_warnings": dict(result.near_warnings),
        "hidden_files_skipped": result.hidden_skipped,
        "splits": {split: dict(counts) for split, counts in result.split_counts.items()},
    }


def format_summary(result: IngestResult) -> str:
    """The stdout summary: what came in, what was refused and why, where the rows went."""
    lines = [
        f"Manifest {result.manifest}"
        + (f" (appended to {result.existing:,} existing rows)" if result.existing else "")
    ]
    lines.append(f"  files seen        {result.seen:>8,}")
    lines.append(f"  accepted          {result.accepted:>8,}")
    lines.append(f"  rejected          {sum(result.rejected.values()):>8,}")
    for code, count in result.rejected.most_common():
        lines.append(f"    {code:<22}{count:>6,}   e.g. {result.rejected_examples[code][:120]}")
    lines.append(
        f"  exact duplicates  {result.duplicates:>8,}"
        + (
            f"   ({result.label_conflicts:,} with a conflicting label: check them)"
            if result.label_conflicts
            else ""
        )
    )
    warnings = ", ".join(f"{kind.replace('_', '-')} {n:,}" for kind, n in result.near_warnings.items())
    lines.append(
        f"  near-dup groups   {result.near_groups:>8,}" + (f"   WARNING: {warnings}" if warnings else "")
    )
    if result.hidden_skipped:
        lines.append(f"  hidden files skipped {result.hidden_skipped:,}")
    lines.append("")
    lines.append(f"  {'new rows':<10}" + "".join(f"{label:>13}" for label in LABELS) + f"{'total':>10}")
    for split in SPLITS:
        counts = result.split_counts[split]
        lines.append(
            f"  {split:<10}"
            + "".join(f"{counts[label]:>13,}" for label in LABELS)
            + f"{sum(counts.values()):>10,}"
        )
    lines.append(f"Report: {result.report} (every rejected file, duplicate and near-duplicate group)")
    return "\n".join(lines)
