"""The audit log: every answered prediction and every officer's feedback, written before the response.

`AuditStore` is the interface; `SQLiteAuditStore` (WAL mode) is the default. A PostgreSQL store would
implement the same methods against `settings.database_url`; `open_audit_store` is where it plugs in.
`ImageStore` keeps uploaded images content-addressed (by SHA-256) for retraining.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from verity.api.settings import Settings
from verity.inference.private_files import PRIVATE_FILE_MODE, image_extension, make_private_dir


def _create_private_file(path: Path) -> None:
    """Creates the database as 0600 before SQLite does (it would make it 0644), and tightens one left
    group- or world-readable by an older version, with its -wal and -shm files."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, PRIVATE_FILE_MODE))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError, PermissionError):
            if file.stat().st_mode & 0o077:
                os.chmod(file, PRIVATE_FILE_MODE)


class AuditError(RuntimeError):
    """The audit store could not record or read; a prediction must then not be answered."""


@dataclass(frozen=True)
class AuditRecord:
    request_id: str
    created: str  # ISO 8601 UTC
    station_id: str | None
    case_id: str | None
    image_sha256: str
    modality: str
    model_name: str
    model_version: str
    score: float
    verdict: str
    alarm_threshold: float
    clear_threshold: float
    latency_ms: float
    image_path: str | None = None
    api: str = "v1"
    # Open-set fields (issue 14). None on rows written before them and for models without a bank.
    recognised: bool | None = None  # the embedding lies near the training set's reference bank
    novelty: float | None = None  # kNN cosine distance to that bank (inference.open_set)
    reasons: str | None = None  # comma-separated: classifier, reference_mismatch, not_recognised, ...
    product: str | None = None  # the product the request named, if any
    reference_status: str | None = None  # match, mismatch or abstained (too few references)
    reference_distance: float | None = None  # to the product's nearest genuine reference
    reference_threshold: float | None = None  # the product's calibrated alarm distance
    reference_count: int | None = None  # genuine references the product had when it was checked
    # Who received the verdict (issue 15): the caller's key id and role (station, admin or anonymous).
    # None on rows written before they were recorded. A station named by an anonymous caller is a
    # claim, not an identity: history and feedback tell the two apart by caller_role.
    key_id: str | None = None
    caller_role: str | None = None


@dataclass(frozen=True)
class ReferenceEvent:
    """One enrolment or removal of a genuine reference image: who did what to which product, when.

    `actor` is the API key id (or "cli:<user>" for `verity refs`), `role` its role."""

    created: str
    action: str  # "add" or "remove"
    model_name: str
    product: str
    image_sha256: str
    reference_id: str
    actor: str | None = None
    role: str | None = None
    source: str | None = None  # the uploaded file's name or the CLI path


@dataclass(frozen=True)
class FeedbackRecord:
    """One officer's confirmation. station_id, key_id and role say who sent it (the caller's key, not
    the verdict's station); role is None on rows written before senders were recorded."""

    request_id: str
    created: str
    confirmed_label: str
    case_id: str | None = None
    notes: str | None = None
    station_id: str | None = None
    key_id: str | None = None
    role: str | None = None


AUDIT_FIELDS = tuple(f.name for f in fields(AuditRecord))
FEEDBACK_FIELDS = tuple(f.name for f in fields(FeedbackRecord))
REFERENCE_EVENT_FIELDS = tuple(f.name for f in fields(ReferenceEvent))


@dataclass(frozen=True)
class HistoryQuery:
    """One page of `AuditStore.history`: newest first by (created, request_id), every filter optional.

    `callers` is the caller's scope: None sees every row; "keyed" only rows received with a key (or
    before receivers were recorded); "anonymous" only rows received without one. `since` and `until`
    are ISO 8601 UTC in the stored form (`utc_now`), `until_exclusive` says whether `until` is itself
    excluded (a date's next midnight) or included (a datetime)."""

    limit: int
    before: tuple[str, str] | None = None  # (created, request_id) of the previous page's last row
    station_id: str | None = None
    callers: str | None = None
    verdict: str | None = None  # genuine, counterfeit, uncertain (recognised) or not_recognised
    since: str | None = None
    until: str | None = None
    until_exclusive: bool = False


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


class AuditStore(Protocol):
    def record(self, records: list[AuditRecord]) -> None:
        """Writes the records durably (all or none) before returning, or raises AuditError."""

    def get(self, request_id: str) -> AuditRecord | None: ...

    def add_feedback(self, feedback: FeedbackRecord) -> None: ...

    def since(self, since: str | None) -> Iterator[AuditRecord]:
        """Records created at or after `since` (ISO 8601), oldest first."""

    def record_reference_event(self, event: ReferenceEvent) -> None:
        """Writes one reference enrolment or removal durably before it takes effect, or raises AuditError."""

    def reference_events(self, model_name: str | None = None) -> list[ReferenceEvent]: ...

    def history(self, query: HistoryQuery) -> list[AuditRecord]:
        """At most `query.limit` records, newest first, read by the index (never the whole table)."""

    def feedback_for(self, request_ids: list[str]) -> dict[str, list[FeedbackRecord]]:
        """Each request id's feedback rows, oldest first (ids without feedback are absent)."""

    def confirmed_cases(self) -> Iterator[tuple[AuditRecord, list[FeedbackRecord]]]:
        """Each audited prediction that has feedback, with all its feedback rows oldest first (whoever
        sent them): api.feedback decides which count and how disagreements resolve."""

    def close(self) -> None: ...


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
"""

# Columns added since the first schema, added in place to older databases (CREATE TABLE IF NOT EXISTS
# leaves an existing table as it was). Old rows keep NULL: their sender's key and role were not recorded.
_ADDED_COLUMNS = {
    "feedback": ("key_id TEXT", "role TEXT"),
    "predictions": (
        "recognised INTEGER", "novelty REAL", "reasons TEXT", "product TEXT", "reference_status TEXT",
        "reference_distance REAL", "reference_threshold REAL", "reference_count INTEGER",
        "key_id TEXT", "caller_role TEXT",
    ),
}


def _audit_record(row: tuple) -> AuditRecord:
    """A predictions row as a record: SQLite keeps `recognised` as 0/1."""
    record = AuditRecord(*row)
    if record.recognised is None:
        return record
    return replace(record, recognised=bool(record.recognised))


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
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.executescript(_SCHEMA)
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

    def record(self, records: list[AuditRecord]) -> None:
        placeholders = ", ".join("?" for _ in AUDIT_FIELDS)
        rows = [tuple(asdict(r).values()) for r in records]
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        f"INSERT INTO predictions ({', '.join(AUDIT_FIELDS)}) VALUES ({placeholders})", rows
                    )
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as error:
            raise AuditError(f"The audit log could not be written: {error}") from error

    def get(self, request_id: str) -> AuditRecord | None:
        with self._lock:
            row = self._db.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM predictions WHERE request_id = ?", (request_id,)
            ).fetchone()
        return _audit_record(row) if row else None

    def add_feedback(self, feedback: FeedbackRecord) -> None:
        values = asdict(feedback)
        try:
            with self._lock:
                self._db.execute(
                    f"INSERT INTO feedback ({', '.join(values)}) VALUES ({', '.join('?' for _ in values)})",
                    tuple(values.values()),
                )
        except sqlite3.Error as error:
            raise AuditError(f"The feedback could not be written: {error}") from error

    def since(self, since: str | None) -> Iterator[AuditRecord]:
        # A separate connection, so a long export never holds the writer's lock.
        reader = sqlite3.connect(self.path)
        try:
            cursor = reader.execute(
                f"SELECT {', '.join(AUDIT_FIELDS)} FROM predictions WHERE created >= ? ORDER BY created",
                (since or "",),
            )
            for row in cursor:
                yield _audit_record(row)
        finally:
            reader.close()

    def history(self, query: HistoryQuery) -> list[AuditRecord]:
        where, arguments = _history_filter(query)
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
        return [_audit_record(row) for row in rows]

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
        columns = ", ".join([*(f"p.{n}" for n in AUDIT_FIELDS), *(f"f.{n}" for n in FEEDBACK_FIELDS)])
        query = f"""
            SELECT {columns} FROM feedback f JOIN predictions p ON p.request_id = f.request_id
            ORDER BY p.created, p.request_id, f.id"""
        reader = sqlite3.connect(self.path)
        try:
            record: AuditRecord | None = None
            rows: list[FeedbackRecord] = []
            for row in reader.execute(query):
                if record is None or record.request_id != row[0]:
                    if record is not None:
                        yield record, rows
                    record, rows = _audit_record(row[: len(AUDIT_FIELDS)]), []
                rows.append(FeedbackRecord(*row[len(AUDIT_FIELDS) :]))
            if record is not None:
                yield record, rows
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

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            try:
                self._db.execute("PRAGMA wal_checkpoint(PASSIVE)")
            finally:
                self._db.close()


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


def _history_filter(query: HistoryQuery) -> tuple[list[str], list[str]]:
    """The WHERE clauses and their arguments of one history page."""
    where: list[str] = []
    arguments: list[str] = []
    if query.callers is not None:
        where.append(_CALLER_FILTERS[query.callers])
    if query.station_id is not None:
        where.append("station_id = ?")
        arguments.append(query.station_id)
    if query.verdict is not None:
        where.append(_VERDICT_FILTERS[query.verdict])
    if query.since is not None:
        where.append("created >= ?")
        arguments.append(query.since)
    if query.until is not None:
        where.append("created < ?" if query.until_exclusive else "created <= ?")
        arguments.append(query.until)
    if query.before is not None:
        created, request_id = query.before
        where.append("(created < ? OR (created = ? AND request_id < ?))")
        arguments.extend((created, created, request_id))
    return where, arguments


def open_audit_store(settings: Settings) -> AuditStore:
    """The store the settings name: SQLite at `audit_db` unless `database_url` says otherwise."""
    url = settings.database_url
    if url is None:
        return SQLiteAuditStore(settings.audit_db, settings.audit_synchronous)
    if url.startswith("sqlite:///"):
        return SQLiteAuditStore(url.removeprefix("sqlite:///"), settings.audit_synchronous)
    scheme = url.split(":", 1)[0]
    raise ValueError(
        f"Unsupported audit database URL scheme {scheme!r}. Supported: sqlite:///PATH. A PostgreSQL store "
        "implements api.audit.AuditStore against a postgresql:// URL and is registered in open_audit_store."
    )




class ImageStore:
    """Content-addressed image files: <root>/<sha[:2]>/<sha>.<ext>, each written once."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put(self, data: bytes, sha256: str, kind: str) -> str:
        target = self.root / sha256[:2] / f"{sha256}.{image_extension(kind)}"
        if not target.exists():
            make_private_dir(target.parent)
            # mkstemp: 0600 and a name of its own, so two uploads of one image never share a temporary.
            handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{sha256}.", suffix=".tmp")
            with os.fdopen(handle, "wb") as out:
                out.write(data)
            os.replace(temporary, target)  # atomic: a reader never sees half an image
        return str(target)
