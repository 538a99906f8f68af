"""GET /v1/history: the caller's recent verdicts from the audit log, newest first, for the console.

Scope, one rule for the list and for one record: a station key sees the verdicts received with its
station's keys (rows from before receivers were recorded count when their station is the key's, as for
feedback); an admin sees every verdict and may filter by station; an anonymous caller (an unkeyed
loopback server) sees the verdicts received without a key. A station named by an anonymous caller is a
claim, so it never puts a verdict in that station's history, not even in an admin's view filtered by
that station: an auditor asking for gate-3's verdicts gets those gate-3's keys received, and finds the
claims in the unfiltered list, where every item says who received it (`caller_role`, `key_id`).

Pages are keyset pages over (created, request_id), read through the index: `next` is an opaque cursor
holding the last row's pair, so a page never re-reads or skips a row as new verdicts arrive.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import UTC, date, datetime, time, timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from verity.api.audit import AuditError, AuditRecord, AuditStore, HistoryQuery
from verity.api.auth import ANONYMOUS, RIGHTHOLDER
from verity.api.deps import AuditDep, Principal, PrincipalDep, SettingsDep
from verity.api.errors import ApiError, error_responses, service_unavailable, truncated
from verity.api.feedback import resolve
from verity.api.schemas import (
    REQUEST_ID_MAX,
    STATION_ID_MAX,
    HistoryItem,
    HistoryPage,
    HistoryVerdict,
)

router = APIRouter(tags=["history"])
log = logging.getLogger("verity.api")

HISTORY_LIMIT_MAX = 100
CURSOR_MAX = 400  # a cursor we issue is about 100 characters


def _invalid(field: str, message: str) -> ApiError:
    return ApiError(422, "invalid_fields", f"{field}: {message}")


def encode_cursor(record: AuditRecord) -> str:
    raw = json.dumps([record.created, record.request_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _is_text(value: object) -> bool:
    """A string SQLite can bind: UTF-8 encodable (JSON's "\\ud800" decodes to a lone surrogate, which
    is not, and made the history a 500)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The (created, request_id) a cursor holds, or a 422: a client only passes back what it was given."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created, request_id = json.loads(raw)
        if _is_text(created) and _is_text(request_id):
            return created, request_id
    except (binascii.Error, ValueError, TypeError):
        pass
    raise _invalid("before", "not a cursor from this endpoint's `next`.")


# The first and last instants a bound can name. A bound at the calendar's edge has no UTC instant
# beyond it (until=9999-12-31 ends at a midnight after year 9999, since=0001-01-01T00:00:00+01:00
# starts an hour before year 1): it is clamped to these, which every stored verdict lies between.
EARLIEST = datetime.min.replace(tzinfo=UTC)
LATEST = datetime.max.replace(tzinfo=UTC)


def _as_utc(moment: datetime) -> datetime:
    """A naive datetime is UTC; an aware one is converted to UTC, clamped to the calendar's edges."""
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    try:
        return moment.astimezone(UTC)
    except OverflowError:  # a positive offset runs before year 1, a negative one past year 9999
        offset = moment.utcoffset() or timedelta()
        return EARLIEST if offset > timedelta() else LATEST


def _stored(moment: datetime) -> str:
    """A UTC datetime in the stored form of `created` (utc_now's), so bounds compare as strings."""
    return moment.isoformat(timespec="microseconds")


def parse_bound(field: str, text: str, end: bool) -> tuple[str, bool]:
    """An ISO 8601 date or datetime as the stored form of `created` (utc_now's), and whether the bound
    is exclusive: a date `until` ends at the next midnight, so it includes the whole day."""
    try:
        day = date.fromisoformat(text)  # a date alone (2026-12-02 or 20261202), before any datetime
    except ValueError:
        day = None
    if day is not None:
        if end and day == date.max:  # the calendar's last day has no next midnight: up to its last instant
            return _stored(LATEST), False
        return _stored(datetime.combine(day + timedelta(days=1) if end else day, time(), UTC)), end
    try:
        moment = _as_utc(datetime.fromisoformat(text))
    except ValueError:
        raise _invalid(
            field, f"{truncated(text)!r} is not an ISO 8601 date (2026-12-02) or datetime (UTC)."
        ) from None
    return _stored(moment), False


def scope_for(principal: Principal, station_id: str | None) -> tuple[str | None, str | None]:
    """(station filter, caller filter) of the caller's history: 403 for a station naming another. A
    right holder's history is its products' verdicts (`HistoryQuery.products`), from every station."""
    if principal.role in ("admin", RIGHTHOLDER):
        # A station's verdicts are those its keys received; anonymous claims of its name are not.
        return station_id, None if station_id is None else "keyed"
    if principal.role == ANONYMOUS:
        # Every anonymous verdict is the anonymous caller's already; a station name only narrows them.
        return station_id, "anonymous"
    if station_id is not None and station_id != principal.station_id:
        raise ApiError(
            403,
            "forbidden",
            f"This key belongs to station {principal.station_id!r}; only an admin key sees another "
            "station's history.",
        )
    return principal.station_id, "keyed"


def in_scope(principal: Principal, record: AuditRecord) -> bool:
    """Whether this caller's history holds this record (the rule scope_for puts in SQL)."""
    if principal.role == "admin":
        return True
    if principal.role == RIGHTHOLDER:
        return record.product in principal.products
    if principal.role == ANONYMOUS:
        return record.caller_role == ANONYMOUS
    return record.station_id == principal.station_id and record.caller_role != ANONYMOUS


def for_rightholder(item: dict[str, Any], sees_stations: bool) -> dict[str, Any]:
    """A history item as a right holder's key sees it: without the station, case, key and officers' notes
    unless the agency lets it see them (VERITY_RIGHTHOLDER_SEES_STATIONS)."""
    if sees_stations:
        return item
    hidden = {**item, "station_id": None, "case_id": None, "key_id": None}
    if hidden["feedback"] is not None:
        hidden["feedback"] = {**hidden["feedback"], "station_id": None, "notes": None}
    return hidden


def history_item(record: AuditRecord, feedback: list[Any]) -> dict[str, Any]:
    """One HistoryItem: the record as answered, with its resolved confirmation."""
    case, _ = resolve(record, feedback)
    winner = case.winner if case is not None else None
    return {
        "request_id": record.request_id,
        "created": record.created,
        "station_id": record.station_id,
        "case_id": record.case_id,
        "product": record.product,
        "modality": record.modality,
        "verdict": record.verdict,
        "score": record.score,
        "thresholds": {"alarm": record.alarm_threshold, "clear": record.clear_threshold},
        "recognised": record.recognised,
        "novelty": record.novelty,
        "reasons": record.reasons.split(",") if record.reasons else [],
        "model": {"name": record.model_name, "version": record.model_version},
        "reference_status": record.reference_status,
        "reference_distance": record.reference_distance,
        "reference_threshold": record.reference_threshold,
        "image_sha256": record.image_sha256,
        "api": record.api,
        "caller_role": record.caller_role,
        "key_id": record.key_id,
        "report_uid": record.report_uid,
        "feedback": None
        if winner is None
        else {
            "confirmed_label": winner.confirmed_label,
            "created": winner.created,
            "notes": winner.notes,
            "station_id": winner.station_id,
            "role": winner.role,
        },
    }


def _read_page(audit: AuditStore, query: HistoryQuery) -> tuple[list[AuditRecord], dict[str, list]]:
    """Blocking: one page of records (and one more, to know whether a next page exists) and their
    feedback, in two indexed queries."""
    records = audit.history(query)
    return records, audit.feedback_for([r.request_id for r in records[: query.limit - 1]])


async def _read(function: Any, *arguments: Any, retry_after_s: int) -> Any:
    try:
        return await run_in_threadpool(function, *arguments)
    except AuditError as error:  # the cause (which may name the database file) is for the log only
        log.error("audit read failed", extra={"error": str(error)})
        message = "The audit log cannot be read; retry shortly."
        raise service_unavailable("audit_unavailable", message, retry_after_s) from error


@router.get(
    "/v1/history",
    response_model=HistoryPage,
    responses=error_responses(401, 403, 422, 503),
    summary="The caller's verdicts, newest first, paged",
    description="A station key sees its station's verdicts, an admin every verdict (and may filter by "
    "`station_id`: the verdicts that station's keys received, never ones an anonymous caller only "
    "claimed for it), an anonymous caller on an unkeyed server the verdicts received without a key. "
    "Each item says who received it: `caller_role` and `key_id`. "
    "Pass `next` back as `before` for the following page. `until` as a date includes that whole day; "
    "dates and datetimes are UTC unless they carry an offset.",
)
async def history(
    audit: AuditDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    limit: Annotated[int, Query(ge=1, le=HISTORY_LIMIT_MAX, description="Items per page.")] = 20,
    before: Annotated[
        str | None, Query(max_length=CURSOR_MAX, description="The previous page's `next`.")
    ] = None,
    verdict: Annotated[
        HistoryVerdict | None,
        Query(description="not_recognised: recognised false; uncertain: the other uncertain verdicts."),
    ] = None,
    since: Annotated[str | None, Query(max_length=40, description="ISO 8601 date or datetime.")] = None,
    until: Annotated[str | None, Query(max_length=40, description="ISO 8601 date or datetime.")] = None,
    station_id: Annotated[
        str | None,
        Query(
            max_length=STATION_ID_MAX,
            description="One station's verdicts: for an admin those its keys received (not anonymous "
            "claims of its name); a station key may name only its own.",
        ),
    ] = None,
) -> dict[str, Any]:
    station, callers = scope_for(principal, station_id)
    since_bound = parse_bound("since", since, end=False)[0] if since is not None else None
    until_bound, until_exclusive = (None, False)
    if until is not None:
        until_bound, until_exclusive = parse_bound("until", until, end=True)
    query = HistoryQuery(
        limit=limit + 1,
        before=decode_cursor(before) if before is not None else None,
        station_id=station,
        callers=callers,
        verdict=verdict,
        since=since_bound,
        until=until_bound,
        until_exclusive=until_exclusive,
        products=principal.products if principal.role == RIGHTHOLDER else None,
    )
    records, feedback = await _read(_read_page, audit, query, retry_after_s=settings.retry_after_s)
    page = records[:limit]
    items = [_shown(principal, settings, history_item(r, feedback.get(r.request_id, []))) for r in page]
    return {"items": items, "next": encode_cursor(page[-1]) if len(records) > limit else None, "limit": limit}


@router.get(
    "/v1/history/{request_id}",
    response_model=HistoryItem,
    responses=error_responses(401, 404, 422, 503),
    summary="One verdict of the caller's history",
    description="The same scope as the list; a verdict outside it is the same 404 as an unknown id.",
)
async def history_record(
    audit: AuditDep,
    principal: PrincipalDep,
    settings: SettingsDep,
    request_id: Annotated[str, Path(min_length=1, max_length=REQUEST_ID_MAX)],
) -> dict[str, Any]:
    record = await _read(audit.get, request_id, retry_after_s=settings.retry_after_s)
    if record is None or not in_scope(principal, record):
        # 404, not 403, for another station's verdict: request ids are quoted on paper (as feedback does).
        raise ApiError(
            404,
            "unknown_request_id",
            f"No audited prediction has request_id {truncated(request_id)!r} for this caller "
            "(a station sees the verdicts it received, an admin all).",
        )
    feedback = await _read(audit.feedback_for, [request_id], retry_after_s=settings.retry_after_s)
    return _shown(principal, settings, history_item(record, feedback.get(request_id, [])))


def _shown(principal: Principal, settings: Any, item: dict[str, Any]) -> dict[str, Any]:
    if principal.role != RIGHTHOLDER:
        return item
    return for_rightholder(item, settings.rightholder_sees_stations)
