"""`verity audit migrate`: copies a SQLite audit log into PostgreSQL, and proves nothing was lost.

Every row of the seven tables (predictions, feedback, reference events, model events, shadow answers,
alerts and their delivery log)
is copied as it is, ids included, in batches; rows the target already holds are kept, so a migration
interrupted or run twice ends the same. Then both sides are read back in key order and compared table
by table: the row counts and a SHA-256 over every row's values. A mismatch is an error (exit status
1), never a warning.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Protocol

from verity.api.audit_records import (
    ALERT_DELIVERY_FIELDS,
    ALERT_FIELDS,
    AUDIT_FIELDS,
    FEEDBACK_FIELDS,
    MODEL_EVENT_FIELDS,
    REFERENCE_EVENT_FIELDS,
    SHADOW_FIELDS,
    AuditError,
)

BATCH = 1000
# table: (columns, key the rows are read and compared in)
TABLES: dict[str, tuple[tuple[str, ...], str]] = {
    "predictions": (AUDIT_FIELDS, "request_id"),
    "feedback": (("id", *FEEDBACK_FIELDS), "id"),
    "reference_events": (("id", *REFERENCE_EVENT_FIELDS), "id"),
    "model_events": (("id", *MODEL_EVENT_FIELDS), "id"),
    "shadow_scores": (SHADOW_FIELDS, "request_id"),
    "alerts": (ALERT_FIELDS, "alert_id"),
    "alert_deliveries": (ALERT_DELIVERY_FIELDS, "alert_id, attempted, attempt"),
}


class RowSource(Protocol):
    def table_rows(self, table: str, names: tuple[str, ...], key: str) -> Iterator[tuple[Any, ...]]: ...


class RowTarget(RowSource, Protocol):
    def import_rows(self, table: str, names: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None: ...


@dataclass(frozen=True)
class TableCheck:
    table: str
    source_rows: int
    target_rows: int
    source_sha256: str
    target_sha256: str

    @property
    def equal(self) -> bool:
        return self.source_rows == self.target_rows and self.source_sha256 == self.target_sha256


def _canonical(value: Any) -> str:
    """One spelling per value on both sides: floats by repr, booleans as 0/1, NULL apart from text."""
    if value is None:
        return "\x00null"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return repr(value)
    return str(value)


def digest(rows: Iterable[tuple[Any, ...]]) -> tuple[int, str]:
    """(row count, SHA-256 over every row's canonical values)."""
    hasher, count = hashlib.sha256(), 0
    for row in rows:
        hasher.update("\x1f".join(_canonical(value) for value in row).encode() + b"\x1e")
        count += 1
    return count, hasher.hexdigest()


def copy_table(source: RowSource, target: RowTarget, table: str) -> None:
    names, key = TABLES[table]
    rows = source.table_rows(table, names, key)
    while batch := list(islice(rows, BATCH)):
        target.import_rows(table, names, batch)


def check_table(source: RowSource, target: RowSource, table: str) -> TableCheck:
    names, key = TABLES[table]
    source_count, source_hash = digest(source.table_rows(table, names, key))
    target_count, target_hash = digest(target.table_rows(table, names, key))
    return TableCheck(table, source_count, target_count, source_hash, target_hash)


def migrate(source: RowSource, target: RowTarget) -> list[TableCheck]:
    """Copies every table (predictions first: feedback refers to them), then checks each; raises
    AuditError naming the tables that differ."""
    for table in TABLES:
        copy_table(source, target, table)
    checks = [check_table(source, target, table) for table in TABLES]
    differing = [check.table for check in checks if not check.equal]
    if differing:
        raise AuditError(
            f"The copy differs from the source in {', '.join(differing)}: the target holds rows the source "
            "does not (migrate into an empty database), or a write failed. Nothing was deleted."
        )
    return checks
