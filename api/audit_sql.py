"""The SQL both audit stores share: a record as a row and back, and the filter of one history page.
Placeholders differ (SQLite `?`, psycopg `%s`), so the filter takes one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, replace
from typing import Any

from verity.api.audit_records import (
    ALERT_DELIVERY_FIELDS,
    ALERT_FIELDS,
    AUDIT_FIELDS,
    FEEDBACK_FIELDS,
    MODEL_EVENT_FIELDS,
    SHADOW_FIELDS,
    Alert,
    AlertDelivery,
    AuditRecord,
    FeedbackRecord,
    HistoryQuery,
    ModelEvent,
    ShadowRecord,
)

# One more change of a name, created at 1 on the first: both stores' SQL (SQLite 3.35+ has RETURNING).
BUMP_GENERATION = (
    "INSERT INTO generations (name, value) VALUES (%s, 1) "
    "ON CONFLICT (name) DO UPDATE SET value = generations.value + 1 RETURNING value"
)


# A key's request bucket after a charge (api/limits.py).
SAVE_BUCKET = (
    "INSERT INTO rate_buckets (key, tokens, counted) VALUES (%s, %s, %s) "
    "ON CONFLICT (key) DO UPDATE SET tokens = excluded.tokens, counted = excluded.counted"
)


def audit_row(record: AuditRecord) -> tuple[Any, ...]:
    """A record as a predictions row in AUDIT_FIELDS order, `recognised` as 0/1."""
    values = asdict(record)
    if values["recognised"] is not None:
        values["recognised"] = int(values["recognised"])
    return tuple(values.values())


def audit_record(row: tuple[Any, ...]) -> AuditRecord:
    """A predictions row as a record: both stores keep `recognised` as 0/1 (one filter SQL for both)."""
    record = AuditRecord(*row)
    if record.recognised is None:
        return record
    return replace(record, recognised=bool(record.recognised))


# Every confirmed verdict with its feedback rows, in the order `cases_with_feedback` groups them by.
CONFIRMED_CASES_SQL = (
    f"SELECT {', '.join([*(f'p.{n}' for n in AUDIT_FIELDS), *(f'f.{n}' for n in FEEDBACK_FIELDS)])} "
    "FROM feedback f JOIN predictions p ON p.request_id = f.request_id "
    "ORDER BY p.created, p.request_id, f.id"
)


def cases_with_feedback(
    rows: Iterable[tuple[Any, ...]],
) -> Iterator[tuple[AuditRecord, list[FeedbackRecord]]]:
    """The rows of CONFIRMED_CASES_SQL as each record with its feedback rows, streamed."""
    record: AuditRecord | None = None
    feedback: list[FeedbackRecord] = []
    for row in rows:
        if record is None or record.request_id != row[0]:
            if record is not None:
                yield record, feedback
            record, feedback = audit_record(row[: len(AUDIT_FIELDS)]), []
        feedback.append(FeedbackRecord(*row[len(AUDIT_FIELDS) :]))
    if record is not None:
        yield record, feedback


# The history's verdict filter: uncertain is an uncertain verdict the model recognised (or from before
# recognition was recorded); an unrecognised image is its own category, whatever its verdict.
_VERDICT_FILTERS = {
    "genuine": "verdict = 'genuine'",
    "counterfeit": "verdict = 'counterfeit'",
    "uncertain": "verdict = 'uncertain' AND (recognised IS NULL OR recognised != 0)",
    "not_recognised": "recognised = 0",
}
_CALLER_FILTERS = {
    "keyed": "(caller_role IS NULL OR caller_role != 'anonymous')",
    "anonymous": "caller_role = 'anonymous'",
}


def history_filter(query: HistoryQuery, mark: str = "?") -> tuple[list[str], list[str]]:
    """The WHERE clauses and their arguments of one history page (`mark`: the placeholder)."""
    where: list[str] = []
    arguments: list[str] = []
    if query.callers is not None:
        where.append(_CALLER_FILTERS[query.callers])
    if query.station_id is not None:
        where.append(f"station_id = {mark}")
        arguments.append(query.station_id)
    if query.products is not None:  # an empty tuple matches nothing: NULL IN () is never true
        where.append(f"product IN ({', '.join([mark] * len(query.products))})" if query.products else "1 = 0")
        arguments.extend(query.products)
    if query.verdict is not None:
        where.append(_VERDICT_FILTERS[query.verdict])
    if query.since is not None:
        where.append(f"created >= {mark}")
        arguments.append(query.since)
    if query.until is not None:
        where.append(f"created < {mark}" if query.until_exclusive else f"created <= {mark}")
        arguments.append(query.until)
    if query.before is not None:
        created, request_id = query.before
        where.append(f"(created < {mark} OR (created = {mark} AND request_id < {mark}))")
        arguments.extend((created, created, request_id))
    return where, arguments


def shadow_record(row: tuple[Any, ...]) -> ShadowRecord:
    """A shadow_scores row as a ShadowRecord (`recognised` stored as an integer or a boolean)."""
    *head, recognised = row
    return ShadowRecord(*head, recognised=None if recognised is None else bool(recognised))


def shadow_row(record: ShadowRecord) -> tuple[Any, ...]:
    """A ShadowRecord as a row of both stores (`recognised` as 0, 1 or NULL, as predictions keep it)."""
    values = asdict(record)
    values["recognised"] = None if record.recognised is None else int(record.recognised)
    return tuple(values[name] for name in SHADOW_FIELDS)


def adopt_alias_sql(mark: str) -> str:
    """One statement that inserts a model event unless its model already has one for its alias."""
    columns = ", ".join(MODEL_EVENT_FIELDS)
    marks = ", ".join(mark for _ in MODEL_EVENT_FIELDS)
    return (
        f"INSERT INTO model_events ({columns}) SELECT {marks} WHERE NOT EXISTS "
        f"(SELECT 1 FROM model_events WHERE model_name = {mark} AND alias = {mark})"
    )


def adopt_alias_arguments(event: ModelEvent) -> tuple[Any, ...]:
    return (*asdict(event).values(), event.model_name, event.alias)


# ------------------------------------------------------------------------------------------ the outbox
ALERTS_TABLES = """
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY, created TEXT NOT NULL, event TEXT NOT NULL, endpoint TEXT NOT NULL,
    request_id TEXT NOT NULL REFERENCES predictions (request_id), payload TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL, next_attempt DOUBLE PRECISION NOT NULL,
    claimed_until DOUBLE PRECISION, delivered TEXT, last_error TEXT
);
CREATE INDEX IF NOT EXISTS alerts_due ON alerts (status, next_attempt);
CREATE INDEX IF NOT EXISTS alerts_created ON alerts (created);
CREATE TABLE IF NOT EXISTS alert_deliveries (
    alert_id TEXT NOT NULL REFERENCES alerts (alert_id), attempted TEXT NOT NULL, attempt INTEGER NOT NULL,
    status_code INTEGER, error TEXT, duration_ms DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (alert_id, attempted, attempt)
);
"""


def insert_alert_sql(mark: str) -> str:
    """An alert into the outbox; one already there (the same event for the same endpoint) is kept."""
    return (
        f"INSERT INTO alerts ({', '.join(ALERT_FIELDS)}) VALUES ({', '.join(mark for _ in ALERT_FIELDS)}) "
        "ON CONFLICT (alert_id) DO NOTHING"
    )


def claim_alerts_sql(mark: str, skip_locked: bool) -> str:
    """Claims the due, unclaimed pending alerts for a lease and returns them. PostgreSQL locks the
    chosen rows and skips those another dispatcher has locked; SQLite's writer lock serialises claims."""
    lock = " FOR UPDATE SKIP LOCKED" if skip_locked else ""
    return (
        f"UPDATE alerts SET claimed_until = {mark} WHERE alert_id IN ("
        f"SELECT alert_id FROM alerts WHERE status = 'pending' AND next_attempt <= {mark} "
        f"AND (claimed_until IS NULL OR claimed_until < {mark}) ORDER BY created LIMIT {mark}{lock}) "
        f"RETURNING {', '.join(ALERT_FIELDS)}"
    )


def finish_attempt_sql(mark: str) -> tuple[str, str]:
    """The delivery log's row, and the alert's new state after the attempt."""
    log = (
        f"INSERT INTO alert_deliveries ({', '.join(ALERT_DELIVERY_FIELDS)}) "
        f"VALUES ({', '.join(mark for _ in ALERT_DELIVERY_FIELDS)})"
    )
    update = (
        f"UPDATE alerts SET status = {mark}, attempts = attempts + 1, next_attempt = {mark}, "
        f"claimed_until = NULL, delivered = {mark}, last_error = {mark} WHERE alert_id = {mark}"
    )
    return log, update


def finish_arguments(
    delivery: AlertDelivery, status: str, next_attempt: float
) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    error = None if status == "delivered" else delivery.error or f"HTTP {delivery.status_code}"
    delivered = delivery.attempted if status == "delivered" else None
    return (
        tuple(asdict(delivery).values()),
        (status, next_attempt, delivered, error, delivery.alert_id),
    )


def retry_alerts_sql(mark: str, count: int | None) -> str:
    """Failed alerts (count None), or the named ones whatever their state, made pending and due."""
    which = "status = 'failed'" if count is None else f"alert_id IN ({', '.join([mark] * count)})"
    return (
        f"UPDATE alerts SET status = 'pending', attempts = 0, next_attempt = {mark}, claimed_until = NULL "
        f"WHERE {which}"
    )


def get_alert_sql(mark: str) -> str:
    return f"SELECT {', '.join(ALERT_FIELDS)} FROM alerts WHERE alert_id = {mark}"


def list_alerts_sql(mark: str, status: str | None) -> str:
    where = f" WHERE status = {mark}" if status else ""
    return f"SELECT {', '.join(ALERT_FIELDS)} FROM alerts{where} ORDER BY created DESC, alert_id LIMIT {mark}"


def alert_deliveries_sql(mark: str) -> str:
    return (
        f"SELECT {', '.join(ALERT_DELIVERY_FIELDS)} FROM alert_deliveries WHERE alert_id = {mark} "
        "ORDER BY attempted, attempt"
    )


def alert_row(alert: Alert) -> tuple[Any, ...]:
    return tuple(asdict(alert).values())
