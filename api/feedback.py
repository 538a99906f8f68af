"""Officers' feedback: who may confirm a verdict, how disagreeing confirmations resolve, and
`verity audit confirmed --out DIR`, which turns confirmed cases and their stored images into a table.

Who may confirm (`may_confirm`, checked by POST /v1/feedback, by GET /v1/history's resolved feedback and
again at export): the station that received the verdict, or an admin. An anonymous caller (only possible
when keys are not required) may confirm only a verdict recorded without a station, as README's security
model says: a station named on an unkeyed server is a claim, not an identity, so labelling a verdict
that names a station (the seizure of gate-3, as far as anyone reading the audit log can tell) takes that
station's key or an admin's. POST /v1/feedback answers such an attempt with 403 when the verdict is the
anonymous caller's own (it sees it in its history anyway), and with the 404 of an unknown id when a key
received it. Rows written before senders were recorded (role NULL) count when their station is the
verdict's; the others, and anonymous rows accepted on station-named verdicts before this rule, are
ignored and counted in the export's summary.

A confirmation is a label (genuine, counterfeit) or "unsure" (the officer cannot tell). Unsure is stored
and shown, and it resolves like any other confirmation (a later unsure replaces an earlier label), but a
case whose winning confirmation is unsure is not training data: the export skips and counts it.

How confirmations resolve (`resolve`, the rule in CONFLICT_RULE, written into every line's meta): an
admin's confirmation wins over the station's, since an admin reviews after the station (a lab result, an
appeal); among equals the latest wins, since a later confirmation by the same station corrects its
earlier one. A case whose authorised confirmations disagree is still exported, marked `admin` or
`latest` in meta.resolution, and listed in the summary so a reviewer can check the `latest` ones.

Each resolved case whose image was stored (VERITY_STORE_IMAGES=true) becomes one line of
`DIR/confirmed.jsonl`, in the table form that `verity data ingest` reads (path, label, modality, case_id,
source, meta), with its image copied to `DIR/images/`. Then

    verity data ingest DIR/confirmed.jsonl --out manifest.jsonl

validates, deduplicates and splits the cases like any other seizure, grouped by case so a seizure never
lands on both sides of a split. The file is the contract between the service and the data tools: `api`
never imports `datasets`, and `datasets` never imports `api`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from verity.api.audit import AuditRecord, AuditStore, FeedbackRecord
from verity.api.auth import ANONYMOUS
from verity.inference.vocabulary import UNSURE

CONFIRMED_TABLE = "confirmed.jsonl"
CONFLICT_RULE = "verdict's station or admin only; admin over station; latest among equals"

# single: one confirmation; agreed: several with one label; admin: they disagreed and an admin's (the
# latest admin's) decided; latest: they disagreed, no admin spoke, and the station's latest decided.
Resolution = Literal["single", "agreed", "admin", "latest"]


def may_confirm(role: str | None, sender_station: str | None, verdict_station: str | None) -> bool:
    """Whether feedback from this sender may label a verdict recorded for `verdict_station`. role None:
    a row from before senders were recorded, trusted only when its station is the verdict's."""
    if role == "admin":
        return True
    if role == ANONYMOUS:
        return verdict_station is None
    return sender_station == verdict_station


@dataclass(frozen=True)
class ResolvedCase:
    record: AuditRecord
    winner: FeedbackRecord
    confirmations: int  # authorised ones
    resolution: Resolution


def resolve(record: AuditRecord, rows: list[FeedbackRecord]) -> tuple[ResolvedCase | None, int]:
    """The confirmation that labels this verdict (None when no row is authorised), and how many rows
    were ignored as unauthorised. `rows` are oldest first."""
    allowed = [
        row for row in rows if may_confirm(row.role, row.station_id, record.station_id)
    ]
    ignored = len(rows) - len(allowed)
    if not allowed:
        return None, ignored
    admins = [row for row in allowed if row.role == "admin"]
    winner = (admins or allowed)[-1]
    if len(allowed) == 1:
        resolution: Resolution = "single"
    elif len({row.confirmed_label for row in allowed}) == 1:
        resolution = "agreed"
    else:
        resolution = "admin" if admins else "latest"
    return ResolvedCase(record, winner, len(allowed), resolution), ignored


@dataclass
class ConfirmedExport:
    table: Path
    written: int = 0
    missing_image: int = 0  # confirmed, but the image was not stored: the label alone cannot train a model
    unsure: int = 0  # the winning confirmation was "cannot tell": no label to train on
    unauthorised: int = 0  # feedback rows ignored: neither the verdict's station nor an admin sent them
    resolved_by_admin: list[str] = field(default_factory=list)  # request ids whose confirmations disagreed
    resolved_by_latest: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        """Lines for the operator: what was written, skipped, ignored, and how conflicts resolved."""
        lines = [f"wrote {self.written} confirmed cases to {self.table}"]
        if self.missing_image:
            lines.append(
                f"skipped {self.missing_image} without a stored image: the server keeps the images of its "
                "verdicts only with VERITY_STORE_IMAGES=1 (a label alone cannot train a model)"
            )
        if self.unsure:
            lines.append(f"skipped {self.unsure} confirmed as unsure (cannot tell): no label to train on")
        if self.unauthorised:
            lines.append(
                f"ignored {self.unauthorised} feedback rows from neither the verdict's station nor an admin"
            )
        conflicts = len(self.resolved_by_admin) + len(self.resolved_by_latest)
        lines.append(
            f"conflicts: {conflicts} cases with disagreeing confirmations ({CONFLICT_RULE}): "
            f"{len(self.resolved_by_admin)} decided by an admin, {len(self.resolved_by_latest)} by the "
            "station's latest"
        )
        review = self.resolved_by_latest
        if review:
            more = f" and {len(review) - 10} more" if len(review) > 10 else ""
            lines.append(f"to review (decided by the latest, no admin): {', '.join(review[:10])}{more}")
        return lines


def export_confirmed(store: AuditStore, out: Path, modality: str | None = None) -> ConfirmedExport:
    """Writes `out/confirmed.jsonl` and `out/images/` from authorised feedback only (a case resolved to
    unsure is skipped); returns what was written, skipped and ignored, and which cases had disagreeing
    confirmations."""
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    result = ConfirmedExport(table=out / CONFIRMED_TABLE)
    with open(result.table, "w", encoding="utf-8") as handle:
        for record, rows in store.confirmed_cases():
            if modality and record.modality != modality:
                continue
            case, ignored = resolve(record, rows)
            result.unauthorised += ignored
            if case is None:
                continue
            if case.winner.confirmed_label == UNSURE:
                result.unsure += 1
                continue
            source = Path(record.image_path) if record.image_path else None
            if source is None or not source.is_file():
                result.missing_image += 1
                continue
            target = images / source.name  # content-addressed name: duplicates collapse
            if not target.exists():
                shutil.copyfile(source, target)
            handle.write(json.dumps(_table_line(case, target.relative_to(out))) + "\n")
            result.written += 1
            if case.resolution == "admin":
                result.resolved_by_admin.append(record.request_id)
            elif case.resolution == "latest":
                result.resolved_by_latest.append(record.request_id)
    return result


def _table_line(case: ResolvedCase, path: Path) -> dict[str, Any]:
    record, feedback = case.record, case.winner
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
            "confirmed_by": {
                "station_id": feedback.station_id,
                "role": feedback.role,
                "key_id": feedback.key_id,
            },
            "confirmations": case.confirmations,
            "resolution": case.resolution,
            "conflict_rule": CONFLICT_RULE,
            "image_sha256": record.image_sha256,
        },
    }
