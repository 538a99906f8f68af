"""What the audit log holds and the contract every store keeps: the records (a prediction, an officer's
feedback, a reference enrolment or removal), the history page query, and `AuditStore`.

The stores: `api.audit.SQLiteAuditStore` (the embedded default) and `api.audit_postgres.PostgresAuditStore`
(one database for many workers and boxes); `api.audit.open_audit_store` picks one from VERITY_AUDIT_DB.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Protocol


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
    recognised: bool | None = None  # the embedding lies near the model's training bank (inference/bank.py)
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
    # The SOP Instance UID of the DICOS Threat Detection Report the answer was (issue 26); None for JSON.
    report_uid: str | None = None


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
class ModelEvent:
    """One change of which version a model's alias names (`verity promote`, `verity rollback`): who, when,
    why, and the comparison behind it. The log is append-only; an alias is its latest event."""

    created: str
    action: str  # "promote" or "rollback"
    model_name: str
    alias: str  # e.g. "production"
    version: str  # what the alias names from now on
    previous_version: str | None = None  # what it named before (None: the alias is new)
    actor: str | None = None  # "cli:<user>"
    why: str | None = None
    comparison: str | None = None  # `verity compare`'s JSON, when one was given


@dataclass(frozen=True)
class ShadowRecord:
    """A candidate model's answer to an audited request (VERITY_SHADOW): recorded, never returned."""

    request_id: str  # the production answer's, in predictions
    created: str
    model_name: str
    model_version: str
    score: float
    verdict: str
    recognised: bool | None = None


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


@dataclass(frozen=True)
class Alert:
    """One signed webhook waiting in the outbox or sent (api/alerts.py): written in the same transaction
    as the confirmation (or the verdict) it reports, so a restart never loses one. `alert_id` is the
    receiver's key for deduplication: the same event for the same endpoint always has the same id.
    Times the dispatcher compares (`next_attempt`, `claimed_until`) are Unix seconds."""

    alert_id: str
    created: str  # ISO 8601 UTC
    event: str  # api.alerts.EVENTS: seizure.confirmed or alarm
    endpoint: str  # the endpoint's name (a right holder's, or the agency's)
    request_id: str  # the verdict it reports
    payload: str  # the JSON body, fixed at creation: every attempt sends the same bytes
    status: str = "pending"  # pending, delivered or failed (given up; `verity alerts retry` revives it)
    attempts: int = 0
    next_attempt: float = 0.0
    claimed_until: float | None = None  # a dispatcher is sending it; another takes it after this
    delivered: str | None = None
    last_error: str | None = None


@dataclass(frozen=True)
class AlertDelivery:
    """One attempt to deliver an alert: the delivery log."""

    alert_id: str
    attempted: str  # ISO 8601 UTC
    attempt: int
    status_code: int | None  # the receiver's HTTP status; None when it could not be reached
    error: str | None
    duration_ms: float


AUDIT_FIELDS = tuple(f.name for f in fields(AuditRecord))
FEEDBACK_FIELDS = tuple(f.name for f in fields(FeedbackRecord))
REFERENCE_EVENT_FIELDS = tuple(f.name for f in fields(ReferenceEvent))
MODEL_EVENT_FIELDS = tuple(f.name for f in fields(ModelEvent))
SHADOW_FIELDS = tuple(f.name for f in fields(ShadowRecord))
ALERT_FIELDS = tuple(f.name for f in fields(Alert))
ALERT_DELIVERY_FIELDS = tuple(f.name for f in fields(AlertDelivery))
ALERT_STATUSES = ("pending", "delivered", "failed")


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
    products: tuple[str, ...] | None = None  # only these products' verdicts (a right holder's history)


class AuditStore(Protocol):
    def record(self, records: list[AuditRecord], alerts: Sequence[Alert] = ()) -> None:
        """Writes the records and the alerts they raise durably (all or none) before returning, or raises
        AuditError. An alert whose id the outbox already holds is kept as it was."""

    def get(self, request_id: str) -> AuditRecord | None: ...

    def add_feedback(self, feedback: FeedbackRecord, alerts: Sequence[Alert] = ()) -> None:
        """Writes the confirmation and the alerts it raises in one transaction, or raises AuditError."""

    def claim_alerts(self, now: float, lease_s: float, limit: int) -> list[Alert]:
        """Up to `limit` pending alerts due at `now` and not claimed by another dispatcher, claimed for
        `lease_s` seconds (a dispatcher that dies lets them go when the lease ends), oldest first."""

    def finish_attempt(self, delivery: AlertDelivery, status: str, next_attempt: float) -> None:
        """Logs one attempt and sets the alert's status (delivered, pending again at `next_attempt`, or
        failed), releasing its claim."""

    def alerts(self, status: str | None = None, limit: int = 100) -> list[Alert]:
        """The newest alerts first (of one status when named)."""

    def alert(self, alert_id: str) -> Alert | None: ...

    def alert_deliveries(self, alert_id: str) -> list[AlertDelivery]:
        """One alert's attempts, oldest first."""

    def retry_alerts(self, alert_ids: Sequence[str] | None, now: float) -> int:
        """Makes failed alerts (or the named ones not yet delivered) pending and due at `now`, with their
        attempts counted afresh; how many changed."""

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

    def record_model_event(self, event: ModelEvent) -> None:
        """Writes one promotion or rollback durably before it takes effect, or raises AuditError."""

    def adopt_alias(self, event: ModelEvent) -> bool:
        """Writes `event` only when its model has no event for its alias yet, atomically for every
        worker and box (two starting at once record one adoption); whether it was written."""

    def model_events(self, model_name: str | None = None) -> list[ModelEvent]:
        """Every promotion and rollback, oldest first (of one model when named)."""

    def record_shadow(self, record: ShadowRecord) -> None:
        """Writes a shadow model's answer to an audited request, or raises AuditError."""

    def shadow_records(self, since: str | None = None) -> list[ShadowRecord]:
        """The shadow answers created at or after `since`, oldest first."""

    def bump_generation(self, name: str) -> int:
        """Counts one more change of `name` (e.g. "models") for every worker to see; returns the count."""

    def generation(self, name: str) -> int:
        """How many changes of `name` were counted (0 for none); each worker polls it (shared_state)."""

    def close(self) -> None: ...


def current_aliases(events: list[ModelEvent]) -> dict[tuple[str, str], ModelEvent]:
    """(model name, alias) -> the event that set it last: what each alias names now."""
    current: dict[tuple[str, str], ModelEvent] = {}
    for event in events:  # oldest first: a later event replaces an earlier one
        current[(event.model_name, event.alias)] = event
    return current
