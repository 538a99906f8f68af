"""`verity data from-feedback`: officers' confirmed cases with their stored images become a manifest.

Closes the loop from seizure to model: each prediction with feedback (the latest wins) whose image was
stored (VERITY_STORE_IMAGES=true) becomes a manifest row labelled with the confirmed outcome, grouped by
its case so a seizure never lands on both sides of a split.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from verity.api.audit import open_audit_store
from verity.api.settings import load_settings
from verity.datasets.manifest import ManifestRow, write_manifest


def from_feedback_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="verity data from-feedback",
        description="Write a manifest of confirmed cases with stored images.",
    )
    parser.add_argument("--out", required=True, help="output folder: manifest.jsonl and images/")
    parser.add_argument("--db", help="SQLite audit database (default: VERITY_AUDIT_DB or var/audit.sqlite)")
    parser.add_argument("--modality", choices=["photo", "xray"], help="only this modality")
    args = parser.parse_args(argv)
    settings = load_settings(**({"audit_db": args.db} if args.db else {}))
    if settings.database_url is None and not Path(settings.audit_db).is_file():
        raise FileNotFoundError(f"No audit database at {settings.audit_db}.")
    out = Path(args.out)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    store = open_audit_store(settings)
    rows, missing = [], 0
    try:
        for record, feedback in store.confirmed_cases():
            if args.modality and record.modality != args.modality:
                continue
            source = Path(record.image_path) if record.image_path else None
            if source is None or not source.is_file():
                missing += 1  # the image was not stored: the label alone cannot train a model
                continue
            target = images / source.name  # content-addressed name: duplicates collapse
            if not target.exists():
                shutil.copyfile(source, target)
            rows.append(
                ManifestRow(
                    path=str(target.relative_to(out)),
                    label=feedback.confirmed_label,
                    modality=record.modality,
                    case_id=feedback.case_id or record.case_id or f"request-{record.request_id}",
                    source="feedback",
                    sha256=record.image_sha256,
                    meta={
                        "request_id": record.request_id,
                        "station_id": record.station_id,
                        "model": f"{record.model_name}/{record.model_version}",
                        "score": record.score,
                        "verdict": record.verdict,
                        "confirmed": feedback.created,
                    },
                )
            )
    finally:
        store.close()
    count = write_manifest(out / "manifest.jsonl", rows)
    print(
        f"wrote {count} confirmed cases to {out / 'manifest.jsonl'}"
        + (f"; skipped {missing} without a stored image" if missing else ""),
        file=sys.stderr,
    )
    return 0
