"""The audit log: every answered prediction and every officer's feedback, written before the response.

`AuditStore` (api/audit_records.py) is the contract; `SQLiteAuditStore` (WAL mode) is the embedded
default and `api.audit_postgres.PostgresAuditStore` the shared one; `open_audit_store` picks one from
VERITY_AUDIT_DB (a path, sqlite:///PATH or postgresql://...). The uploaded images themselves are kept
by `api.image_store.ImageStore`.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from verity.api.audit_records import (
    AUDIT_FIELDS,
    FEEDBACK_FIELDS,
    MODEL_EVENT_FIELDS,
    REFERENCE_EVENT_FIELDS,
    SHADOW_FIELDS,
    Alert,
    AlertDelivery,
    AuditError,
    AuditRecord,
    AuditStore,
    FeedbackRecord,
    HistoryQuery,
    ModelEvent,
    ReferenceEvent,
    ShadowRecord,
)
from verity.api.audit_sql import (
    ALERTS_TABLES,
    BUMP_GENERATION,
    CONFIRMED_CASES_SQL,
    SAVE_BUCKET,
    adopt_alias_arguments,
    adopt_alias_sql,
    alert_deliveries_sql,
    alert_row,
    audit_record,
    audit_row,
    cases_with_feedback,
    claim_alerts_sql,
    finish_arguments,
    finish_attempt_sql,
    get_alert_sql,
    history_filter,
    insert_alert_sql,
    list_alerts_sql,
    retry_alerts_sql,
    shadow_record,
    shadow_row,
)
from verity.api.limits import charge, refill
from verity.api.settings import Settings
from verity.inference.private_files import PRIVATE_FILE_MODE, make_private_dir

if TYPE_CHECKING:
    from verity.api.audit_postgres import PostgresAuditStore

__all__ = [  # the records and the contract are defined in audit_records; their users import them here
    "AUDIT_FIELDS", "FEEDBACK_FIELDS", "REFERENCE_EVENT_FIELDS", "AuditError", "AuditRecord", "AuditStore",
    "FeedbackRecord", "HistoryQuery", "ModelEvent", "ReferenceEvent", "SQLiteAuditStore",
    "ShadowRecord", "open_audit_store",
]  # fmt: skip


def _create_private_file(path: Path) -> None:
    """Creates the database as 0600 before SQLite does (it would make it 0644), and tightens one left
    group- or world-readable by an older version, with its -wal and -shm files."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if file.stat().st_mode & 0o077:
                os.chmod(file, PRIVATE_FILE_MODE)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, created TEXT NOT NULL, station_id TEXT, case_id TEXT,
    image_sha256 TEXT NOT NULL, modality TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
    score REAL NOT NULL, verdict TEXT NOT NULL, alarm_threshold REAL NOT NULL, clear_threshold REAL NOT NULL,
    latency_ms REAL NOT NULL, image_path TEXT, api TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);
-- The history's keyset pages: (created, request_id) for an admin, per station for a station key.
CREATE INDEX IF NOT EXISTS predictions_created_id ON predictions (created, request_id);
CREATE INDEX IF NOT EXISTS predictions_station_created ON predictions (station_id, created, request_id);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES predictions (request_id),
    created TEXT NOT NULL, confirmed_label TEXT NOT NULL, case_id TEXT, notes TEXT, station_id TEXT,
    key_id TEXT, role TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
CREATE TABLE IF NOT EXISTS reference_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL, action TEXT NOT NULL,
    model_name TEXT NOT NULL, product TEXT NOT NULL, image_sha256 TEXT NOT NULL, reference_id TEXT NOT NULL,
    actor TEXT, role TEXT, source TEXT
);
CREATE INDEX IF NOT EXISTS reference_events_created ON reference_events (created);
-- Counters of changes every worker must follow (api/shared_state.py), e.g. a model reload.
CREATE TABLE IF NOT EXISTS generations (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
-- Each key's request bucket when the rate is shared by the workers (api/limits.SharedRequestRate).
CREATE TABLE IF NOT EXISTS rate_buckets (key TEXT PRIMARY KEY, tokens REAL NOT NULL, counted REAL NOT NULL);
-- A candidate model's answers to audited requests (VERITY_SHADOW), never returned to the client.
CREATE TABLE IF NOT EXISTS shadow_scores (
    request_id TEXT PRIMARY KEY REFERENCES predictions (request_id), created TEXT NOT NULL,
    model_name TEXT NOT NULL, model_version TEXT NOT NULL, score REAL NOT NULL, verdict TEXT NOT NULL,
    recognised INTEGER
);
CREATE INDEX IF NOT EXISTS shadow_scores_created ON shadow_scores (created);
-- Which version each model alias names (`verity promote`, `verity rollback`), an append-only log.
CREATE TABLE IF NOT EXISTS model_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created TEXT NOT NULL, action TEXT NOT NULL,
    model_name TEXT NOT NULL, alias TEXT NOT NULL, version TEXT NOT NULL, previous_version TEXT,
    actor TEXT, why TEXT, comparison TEXT
);
"""

# Columns added since the first schema, added in place to older databases (CREATE TABLE IF NOT EXISTS
# leaves an existing table as it was). Old rows keep NULL: their sender's key and role were not recorded.
_ADDED_COLUMNS = {
    "feedback": ("key_id TEXT", "role TEXT"),
    "predictions": (
        "recognised INTEGER", "novelty REAL", "reasons TEXT", "product TEXT", "reference_status TEXT",
        "reference_distance REAL", "reference_threshold REAL", "reference_count INTEGER",
        "key_id TEXT", "caller_role TEXT", "report_uid TEXT",
    ),
}


POSTGRES_SCHEMES = ("postgresql", "postgres")


class SQLiteAuditStore:
    """SQLite in WAL mode: readers never block the writer; a committed row survives a killed process."""

    def __init__(self, path: str | Path, synchronous: str = "normal") -> None:
        self.path = Path(path)
        make_private_dir(self.path.parent)
        self._lock = threading.Lock()
        try:
            _create_private_file(self.path)  # SQLite gives the -wal and -shm files the database's mode
            # One connection shared by the threadpool, serialized by the lock: writes are short.
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=10)
            self._db.execute("PRAGMA journal_mode=WAL")
            # Feedback must name an audited prediction, as the PostgreSQL store's REFERENCES enforces.
            self._db.execute("PRAGMA foreign_keys=ON")
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA + ALERTS_TABLES)
            self._migrate()
        except (sqlite3.Error, OSError) as error:
            raise AuditError(f"Cannot open the audit database {self.path}: {error}") from error

    def _migrate(self) -> None:
        """ALTER TABLE ... ADD COLUMN for each column an older database lacks. Inside one immediate
        transaction that reads the columns again, so two processes opening an old file at once do not
        both add the same column."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for table, columns in _ADDED_COLUMNS.items():
                present = {row[1] for row in self._db.execute(f"PRAGMA table_info({table})")}
                for column in columns:
                    if column.split()[0] not in present:
                        self._db.execute(f"ALTER TABLE {table} ADD COLUMN {column}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        """One immediate transaction under the lock: committed whole or rolled back, else AuditError."""
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as error:
            raise AuditError(f"The {what} could not be written: {error}") from error

    def record(self, records: list[AuditRecord], alerts: Sequence[Alert] = ()) -> None:
        placeholders = ", ".join("?" for _ in AUDIT_FIELDS)
        with self._transaction("audit log") as db:
            db.executemany(
                f"INSERT INTO predictions ({', '.join(AUDIT_FIELDS)}) VALUES ({placeholders})",
                [audit_row(r) for r in records],
            )
            db.executemany(insert_alert_sql("?"), [alert_row(alert) for alert in alerts])

    def get(self, request_id: str) -> AuditRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM predictions WHERE request_id = ?", (request_id,)
            ).fetchone()
        return audit_record(row) if row else None

    def add_feedback(self, feedback: FeedbackRecord, alerts: Sequence[Alert] = ()) -> None:
        values = asdict(feedback)
        with self._transaction("feedback") as db:
            db.execute(
                f"INSERT INTO feedback ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                tuple(values.values()),
            )
            db.executemany(insert_alert_sql("?"), [alert_row(alert) for alert in alerts])

    # The outbox of signed alerts (api/alerts.py, api/alert_delivery.py) -----------------------------
    def claim_alerts(self, now: float, lease_s: float, limit: int) -> list[Alert]:
        with self._transaction("alert claim") as db:
            rows = db.execute(claim_alerts_sql("?", skip_locked=False), (now + lease_s, now, now, limit))
            claimed = [Alert(*row) for row in rows.fetchall()]
        return sorted(claimed, key=lambda alert: (alert.created, alert.alert_id))

    def finish_attempt(self, delivery: AlertDelivery, status: str, next_attempt: float) -> None:
        log_sql, update_sql = finish_attempt_sql("?")
        log_row, update_row = finish_arguments(delivery, status, next_attempt)
        with self._transaction("alert delivery") as db:
            db.execute(log_sql, log_row)
            db.execute(update_sql, update_row)

    def alerts(self, status: str | None = None, limit: int = 100) -> list[Alert]:
        arguments = (status, limit) if status else (limit,)
        with self._lock:
            rows = self._db.execute(list_alerts_sql("?", status), arguments).fetchall()
        return [Alert(*row) for row in rows]

    def alert(self, alert_id: str) -> Alert | None:
        with self._lock:
            row = self._db.execute(get_alert_sql("?"), (alert_id,)).fetchone()
        return Alert(*row) if row else None

    def alert_deliveries(self, alert_id: str) -> list[AlertDelivery]:
        with self._lock:
            rows = self._db.execute(alert_deliveries_sql("?"), (alert_id,)).fetchall()
        return [AlertDelivery(*row) for row in rows]

    def retry_alerts(self, alert_ids: Sequence[str] | None, now: float) -> int:
        sql = retry_alerts_sql("?", None if alert_ids is None else len(alert_ids))
        with self._transaction("alert retry") as db:
            return db.execute(sql, (now, *(alert_ids or ()))).rowcount

    def since(self, since: str | None) -> Iterator[AuditRecord]:
        # A separate connection, so a long export never holds the writer's lock.
        reader = sqlite3.connect(self.path)
        try:
            cursor = reader.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM predictions WHERE created >= ? ORDER BY created",
                (since or "",),
            )
            for row in cursor:
                yield audit_record(row)
        finally:
            reader.close()

    def history(self, query: HistoryQuery) -> list[AuditRecord]:
        where, arguments = history_filter(query)
        sql = (
            f"SELECT {', '.join(AUDIT_FIELDS)} FROM predictions"
            + (f" WHERE {' AND '.join(where)}" if where else "")
            + " ORDER BY created DESC, request_id DESC LIMIT ?"
        )
        try:
            with self._lock:
                rows = self._db.execute(sql, (*arguments, query.limit)).fetchall()
        except sqlite3.Error as error:
            raise AuditError(f"The audit log could not be read: {error}") from error
        return [audit_record(row) for row in rows]

    def feedback_for(self, request_ids: list[str]) -> dict[str, list[FeedbackRecord]]:
        if not request_ids:
            return {}
        sql = (
            f"SELECT {', '.join(FEEDBACK_FIELDS)} FROM feedback "
            f"WHERE request_id IN ({', '.join('?' for _ in request_ids)}) ORDER BY id"
        )
        try:
            with self._lock:
                rows = self._db.execute(sql, tuple(request_ids)).fetchall()
        except sqlite3.Error as error:
            raise AuditError(f"The audit log could not be read: {error}") from error
        found: dict[str, list[FeedbackRecord]] = {}
        for row in rows:
            found.setdefault(row[0], []).append(FeedbackRecord(*row))
        return found

    def confirmed_cases(self) -> Iterator[tuple[AuditRecord, list[FeedbackRecord]]]:
        reader = sqlite3.connect(self.path)
        try:
            yield from cases_with_feedback(reader.execute(CONFIRMED_CASES_SQL))
        finally:
            reader.close()

    def record_reference_event(self, event: ReferenceEvent) -> None:
        """Writes one enrolment or removal durably, or raises AuditError (the change is then refused)."""
        values = asdict(event)
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO reference_events ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' for _ in values)})",
                    tuple(values.values()),
                )
        except sqlite3.Error as error:
            raise AuditError(f"The reference event could not be written: {error}") from error

    def reference_events(self, model_name: str | None = None) -> list[ReferenceEvent]:
        """Every enrolment and removal, oldest first (of one model when named)."""
        query = f"SELECT {', '.join(REFERENCE_EVENT_FIELDS)} FROM reference_events"
        arguments: tuple[str, ...] = ()
        if model_name is not None:
            query, arguments = query + " WHERE model_name = ?", (model_name,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", arguments).fetchall()
        return [ReferenceEvent(*row) for row in rows]

    def record_model_event(self, event: ModelEvent) -> None:
        """Writes one promotion or rollback durably, or raises AuditError (the change is then refused)."""
        values = asdict(event)
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO model_events ({', '.join(values)}) "
                    f"VALUES ({', '.join('?' for _ in values)})",
                    tuple(values.values()),
                )
        except sqlite3.Error as error:
            raise AuditError(f"The model event could not be written: {error}") from error

    def record_shadow(self, record: ShadowRecord) -> None:
        marks = ", ".join("?" * len(SHADOW_FIELDS))
        sql = f"INSERT INTO shadow_scores ({', '.join(SHADOW_FIELDS)}) VALUES ({marks})"
        try:
            with self._lock:
                self._db.execute(sql, shadow_row(record))
        except sqlite3.Error as error:
            raise AuditError(f"The shadow answer could not be written: {error}") from error

    def shadow_records(self, since: str | None = None) -> list[ShadowRecord]:
        query = f"SELECT {', '.join(SHADOW_FIELDS)} FROM shadow_scores WHERE created >= ? ORDER BY created"
        with self._lock:
            rows = self._db.execute(query, (since or "",)).fetchall()
        return [shadow_record(row) for row in rows]

    def adopt_alias(self, event: ModelEvent) -> bool:
        """One statement: SQLite holds the database's write lock for it, so two processes write one."""
        try:
            with self._lock:
                cursor = self._db.execute(adopt_alias_sql("?"), adopt_alias_arguments(event))
        except sqlite3.Error as error:
            raise AuditError(f"The model event could not be written: {error}") from error
        return cursor.rowcount == 1

    def model_events(self, model_name: str | None = None) -> list[ModelEvent]:
        query = f"SELECT {', '.join(MODEL_EVENT_FIELDS)} FROM model_events"
        arguments: tuple[str, ...] = ()
        if model_name is not None:
            query, arguments = query + " WHERE model_name = ?", (model_name,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY id", arguments).fetchall()
        return [ModelEvent(*row) for row in rows]

    def bump_generation(self, name: str) -> int:
        try:
            with self._lock:
                row = self._db.execute(BUMP_GENERATION.replace("%s", "?"), (name,)).fetchone()
        except sqlite3.Error as error:
            raise AuditError(f"The change of {name} could not be recorded: {error}") from error
        return int(row[0])

    def take_token(self, key: str, rate: float, burst: int, now: float) -> float:
        """One request charged to `key`'s shared bucket (api/limits.py): 0.0, or the seconds to wait."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # read, refill and write as one step for every worker
            try:
                row = self._db.execute(
                    "SELECT tokens, counted FROM rate_buckets WHERE key = ?", (key,)
                ).fetchone()
                tokens = refill(row[0], row[1], now, rate, burst) if row else float(burst)
                tokens, wait = charge(tokens, rate)
                self._db.execute(SAVE_BUCKET.replace("%s", "?"), (key, tokens, now))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return wait

    def generation(self, name: str) -> int:
        with self._lock:
            row = self._db.execute("SELECT value FROM generations WHERE name = ?", (name,)).fetchone()
        return int(row[0]) if row else 0

    def table_rows(self, table: str, names: tuple[str, ...], key: str) -> Iterator[tuple[Any, ...]]:
        """Every row of `table` in `key` order, through a connection of its own (migration reads)."""
        reader = sqlite3.connect(self.path)
        try:
            yield from reader.execute(f"SELECT {', '.join(names)} FROM {table} ORDER BY {key}")
        finally:
            reader.close()

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                self._db.close()


def open_audit_store(settings: Settings) -> AuditStore:
    """The store VERITY_AUDIT_DB names: a file path or sqlite:///PATH (SQLite, the embedded default), or
    postgresql://... (api/audit_postgres.py, the `postgres` extra). Any other URL is refused: the audit is
    never written anywhere but where the operator said."""
    target = settings.audit_db
    if "://" not in target:
        return SQLiteAuditStore(target, settings.audit_synchronous)
    scheme = target.split("://", 1)[0].lower()
    if scheme == "sqlite":
        return SQLiteAuditStore(target.removeprefix("sqlite:///"), settings.audit_synchronous)
    if scheme in POSTGRES_SCHEMES:
        return open_postgres_store(target, settings.audit_pool_size)
    raise AuditError(
        f"Unsupported audit database URL scheme {scheme!r} in VERITY_AUDIT_DB. It takes a file path, "
        "sqlite:///PATH or postgresql://USER:PASSWORD@HOST:PORT/DATABASE."
    )


def open_postgres_store(url: str, max_connections: int) -> PostgresAuditStore:
    """The PostgreSQL store, or an AuditError that says which extra to install."""
    try:
        from verity.api.audit_postgres import PostgresAuditStore
    except ImportError as error:
        raise AuditError(
            "VERITY_AUDIT_DB names a PostgreSQL database but psycopg is not installed: "
            "pip install 'verity[postgres]'."
        ) from error
    return PostgresAuditStore(url, max_connections)
