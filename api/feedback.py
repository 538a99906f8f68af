"""`verity audit confirmed --out DIR`: officers' confirmed cases with their stored images, ready to ingest.

Closes the loop from seizure to model. Each audited prediction with feedback (the latest wins) whose
image was stored (VERITY_STORE_IMAGES=true) becomes one line of `DIR/confirmed.jsonl`, in the table form
that `verity data ingest` reads (path, label, modality, case_id, source, meta), with its image copied to
`DIR/images/`. Then

    verity data ingest DIR/confirmed.jsonl --out manifest.jsonl

validates, deduplicates and splits the cases like any other seizure, grouped by case so a seizure never
lands on both sides of a split. The file is the contract between the service and the data tools: `api`
never imports `datasets`, and `datasets` never imports `api`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from verity.api.audit import AuditRecord, AuditStore, FeedbackRecord

CONFIRMED_TABLE = "confirmed.jsonl"


@dataclass(frozen=True)
class ConfirmedExport:
    table: Path
    written: int
    missing_image: int  # confirmed, but the image was not stored: the label alone cannot train a model


def export_confirmed(store: AuditStore, out: Path, modality: str | None = None) -> ConfirmedExport:
    """Writes `out/confirmed.jsonl` and `out/images/`; returns what was written and skipped."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    table = out / CONFIRMED_TABLE
    written = missing = 0
    with open(table, "w", encoding="utf-8") as handle:
        for record, feedback in store.confirmed_cases():
            if modality and record.modality != modality:
                continue
            source = Path(record.image_path) if record.image_path else None
            if source is None or not source.is_file():
                missing += 1
                continue
            target = images / source.name  # content-addressed name: duplicates collapse
            if not target.exists():
                shutil.copyfile(source, target)
            handle.write(json.dumps(_table_line(record, feedback, target.relative_to(out))) + "\n")
            written += 1
    return ConfirmedExport(table=table, written=written, missing_image=missing)


def _table_line(record: AuditRecord, feedback: FeedbackRecord, path: Path) -> dict[str, Any]:
    return {
        "path": path.as_posix(),
        "label": feedback.confirmed_label,
        "modality": record.modality,
        "case_id": feedback.case_id or record.case_id or f"request-{record.request_id}",
        "source": "feedback",
        "meta": {
            "request_id": record.request_id,
            "station_id": record.station_id,
            "model": f"{record.model_name}/{record.model_version}",
            "score": record.score,
            "verdict": record.verdict,
            "confirmed": feedback.created,
            "image_sha256": record.image_sha256,
        },
    }
