"""The sources `verity data ingest` reads: a folder tree or a CSV/JSONL table, as candidate files.

A folder tree gives each file's label and modality from the folder names above it, at any depth (label
names: datasets.rows.LABEL_SYNONYMS, the ones training and evaluation accept too); a table gives them per
row. A candidate whose source says nothing usable carries the problem, and ingest reports it.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verity.datasets.rows import LABEL_SYNONYMS, label_folder_names, label_for_folder
from verity.inference.vocabulary import MODALITIES

if TYPE_CHECKING:  # ingest imports this module; the options are only read here
    from verity.datasets.ingest import IngestOptions

# Folder and column names accepted for each modality (compared in lower case).
MODALITY_NAMES = {"photo": "photo", "photos": "photo", "xray": "xray", "x-ray": "xray", "x_ray": "xray"}
TABLE_COLUMNS = ("path", "label", "modality", "product", "case_id", "source")
TABLE_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}


@dataclass
class Candidate:
    """One file named by the source, with what the source says about it."""

    path: Path
    shown: str  # how the report names the file: as the source gave it
    label: str | None = None
    modality: str | None = None
    product: str | None = None
    case_id: str | None = None
    source: str | None = None
    meta: dict | None = None
    problem: tuple[str, str] | None = None  # (code, reason) when the source row itself is unusable


def _label(value: object) -> str | None:
    return label_for_folder(str(value)) if value not in (None, "") else None


def _modality(value: object) -> str | None:
    return MODALITY_NAMES.get(str(value).strip().lower()) if value not in (None, "") else None


def _finish(
    candidate: Candidate, raw_label: object, raw_modality: object, options: IngestOptions
) -> Candidate:
    """Resolves label and modality; an unusable value becomes the candidate's problem."""
    candidate.label = _label(raw_label)
    candidate.modality = _modality(raw_modality) if raw_modality not in (None, "") else options.modality
    if candidate.problem:
        return candidate
    if candidate.label is None:
        valid = ", ".join(sorted(LABEL_SYNONYMS))
        candidate.problem = ("bad_label", f"label {raw_label!r} is not one of {valid}")
    elif candidate.modality is None:
        candidate.problem = (
            ("no_modality", "no modality: pass --modality photo|xray or give a modality column")
            if raw_modality in (None, "")
            else ("bad_modality", f"modality {raw_modality!r} is not one of {', '.join(MODALITIES)}")
        )
    return candidate


def iter_folder(
    root: Path, options: IngestOptions, hidden: list[int], exclude: frozenset[Path] = frozenset()
) -> Iterator[Candidate]:
    """Files under `root` in sorted order; label and modality from folder names at any depth.

    `exclude` holds our own outputs (manifest, report) when they are written inside the tree."""
    excluded_names = {path.name for path in exclude}
    for directory, dirnames, filenames in os.walk(root):
        hidden[0] += sum(name.startswith(".") for name in dirnames + filenames)
        dirnames[:] = sorted(name for name in dirnames if not name.startswith("."))
        parts = Path(directory).relative_to(root).parts
        labels = {label for label in map(label_for_folder, parts) if label is not None}
        modalities = {MODALITY_NAMES[p.lower()] for p in parts if p.lower() in MODALITY_NAMES}
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(directory) / name
            if exclude and name in excluded_names and path.resolve() in exclude:
                continue
            candidate = Candidate(path=path, shown=str(path.relative_to(root)), source=options.source)
            if options.case_from_folder:
                case_parts = [
                    p for p in parts if label_for_folder(p) is None and p.lower() not in MODALITY_NAMES
                ]
                candidate.case_id = "/".join(case_parts) or None
            if len(labels) > 1 or len(modalities) > 1:
                candidate.problem = (
                    "ambiguous_folder",
                    f"the folders above name several labels or modalities: {'/'.join(parts)}",
                )
            elif not labels:
                candidate.problem = (
                    "no_label",
                    f"no label folder above this file ({label_folder_names()})",
                )
            yield _finish(candidate, next(iter(labels), "genuine"), next(iter(modalities), None), options)


def _table_candidate(record: dict[str, Any], base: Path, where: str, options: IngestOptions) -> Candidate:
    raw_path = str(record.get("path") or "").strip()
    path = Path(raw_path)
    candidate = Candidate(
        path=path if path.is_absolute() else base / path,
        shown=raw_path or where,
        product=str(record["product"]) if record.get("product") not in (None, "") else None,
        case_id=str(record["case_id"]) if record.get("case_id") not in (None, "") else None,
        source=str(record["source"]) if record.get("source") not in (None, "") else options.source,
    )
    extra = {
        k: v for k, v in record.items() if k not in TABLE_COLUMNS and k != "meta" and v not in (None, "")
    }
    if isinstance(record.get("meta"), dict):
        extra = {**record["meta"], **extra}
    candidate.meta = extra or None
    if not raw_path:
        candidate.problem = ("no_path", f"{where}: the row has no path")
    return _finish(candidate, record.get("label"), record.get("modality"), options)


def iter_table(table: Path, options: IngestOptions) -> Iterator[Candidate]:
    """Rows of a CSV or JSONL; relative paths are taken from the table's folder."""
    base = table.resolve().parent
    with open(table, encoding="utf-8-sig", newline="") as handle:
        if TABLE_SUFFIXES[table.suffix.lower()] == "csv":
            reader = csv.DictReader(handle)
            missing = {"path", "label"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{table}: the CSV needs columns path and label (missing: {', '.join(sorted(missing))})."
                )
            for number, record in enumerate(reader, start=2):
                yield _table_candidate(record, base, f"{table.name}:{number}", options)
            return
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            where = f"{table.name}:{number}"
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as error:
                yield Candidate(path=Path(), shown=where, problem=("bad_row", f"{where}: {error}"))
                continue
            yield _table_candidate(record, base, where, options)


def count_items(src: Path) -> int:
    """How many candidates the source holds, for the progress bar (a cheap pass, no file is read)."""
    if src.is_dir():
        return sum(
            sum(not name.startswith(".") for name in files)
            for directory, dirs, files in os.walk(src)
            if not any(part.startswith(".") for part in Path(directory).relative_to(src).parts)
        )
    with open(src, encoding="utf-8-sig") as handle:
        lines = sum(1 for line in handle if line.strip())
    return lines - 1 if src.suffix.lower() == ".csv" else lines


def _has_modality_folder(root: Path) -> bool:
    return any(name.lower() in MODALITY_NAMES for _, dirnames, _ in os.walk(root) for name in dirnames)


def iter_source(
    src: Path, options: IngestOptions, hidden: list[int], exclude: frozenset[Path] = frozenset()
) -> Iterator[Candidate]:
    """Candidates from a folder, CSV or JSONL; raises ValueError for anything else."""
    if src.is_dir():
        if options.modality is None and not _has_modality_folder(src):
            raise ValueError(
                f"{src} has no photo/ or xray/ folder to tell the modality: pass --modality photo|xray."
            )
        return iter_folder(src, options, hidden, exclude)
    if src.is_file() and src.suffix.lower() in TABLE_SUFFIXES:
        return iter_table(src, options)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist.")
    raise ValueError(f"{src}: SRC must be a folder, a .csv or a .jsonl file.")
