"""The manifest: one JSON object per line, one line per image.

Paths are stored relative to the manifest's own folder when they lie below it, so a dataset folder
can be moved or copied as a whole.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from verity.inference.vocabulary import LABELS, MODALITIES, SPLITS


class ManifestError(ValueError):
    """A manifest line that cannot be used, with the line number in the message."""


@dataclass(frozen=True)
class ManifestRow:
    path: str
    label: str
    modality: str
    product: str | None = None
    case_id: str | None = None
    source: str | None = None
    sha256: str | None = None
    split: str | None = None
    # Extra facts a generator or ingest knows (e.g. which counterfeit cues were applied).
    meta: dict | None = None

    def __post_init__(self) -> None:
        if self.label not in LABELS:
            raise ManifestError(f"Invalid label {self.label!r}. Only {', '.join(LABELS)} are supported.")
        if self.modality not in MODALITIES:
            raise ManifestError(
                f"Invalid modality {self.modality!r}. Only {', '.join(MODALITIES)} are supported."
            )
        if self.split is not None and self.split not in SPLITS:
            raise ManifestError(f"Invalid split {self.split!r}. Only {', '.join(SPLITS)} are supported.")

    @property
    def target(self) -> int:
        """Class index: 0 genuine, 1 counterfeit."""
        return LABELS.index(self.label)

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, sort_keys=False)

    @classmethod
    def from_dict(cls, data: dict) -> ManifestRow:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ManifestError(f"Unknown manifest fields: {', '.join(sorted(unknown))}")
        if "path" not in data or "label" not in data or "modality" not in data:
            raise ManifestError("A manifest row needs path, label and modality.")
        return cls(**data)


def read_manifest(path: str | Path) -> Iterator[ManifestRow]:
    """Yields the rows one at a time, so a manifest of any size streams."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield ManifestRow.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError, ManifestError) as error:
                raise ManifestError(f"{path}:{number}: {error}") from error


def write_manifest(path: str | Path, rows: Iterable[ManifestRow], append: bool = False) -> int:
    """Writes rows as JSONL; returns how many were written."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with open(path, "a" if append else "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(row.to_json() + "\n")
            count += 1
    return count


def resolve_image_path(manifest_path: str | Path, row: ManifestRow) -> Path:
    """The absolute path of a row's image: relative paths are taken from the manifest's folder."""
    image = Path(row.path)
    return image if image.is_absolute() else Path(manifest_path).resolve().parent / image
