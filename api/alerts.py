"""Seizure alerts: which confirmations and verdicts raise one, for whom, what it says, and how it is signed.

An officer's confirmed counterfeit naming a product raises one `seizure.confirmed` alert for each right
holder owning the product (its active keys name it) that has an endpoint, and one for the agency's
endpoint when set. An endpoint with `on_alarm` also gets an `alarm` for every counterfeit verdict
(naming its products, for a holder; any, for the agency). The alerts are written into the outbox in the
same transaction as the confirmation or the verdict (api/audit.py), then sent by api/alert_delivery.py:
an answer never waits for a receiver, and a restart loses none.

Each alert's id is fixed by what it reports (event, verdict, endpoint): confirming the same seizure again
raises nothing new, and a receiver deduplicates by the id (delivery is at least once: an answer lost on
the way back is retried).

The signature, for a receiver to check (`verify`):

    Verity-Timestamp: <Unix seconds when sent>
    Verity-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>." + body)>

A receiver recomputes it over the raw body, compares in constant time, and refuses a timestamp more than
five minutes from its clock, so a captured alert cannot be replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from verity.api.alert_endpoints import AGENCY, AlertEndpoint, EndpointStore
from verity.api.audit_records import Alert, AuditRecord, FeedbackRecord
from verity.api.auth import RIGHTHOLDER, KeyStore
from verity.inference.stamps import utc_now
from verity.inference.vocabulary import COUNTERFEIT

CONFIRMED = "seizure.confirmed"
ALARM = "alarm"
EVENTS = (CONFIRMED, ALARM)
SIGNATURE_HEADER = "Verity-Signature"
TIMESTAMP_HEADER = "Verity-Timestamp"
ID_HEADER = "Verity-Alert-Id"
REPLAY_TOLERANCE_S = 300


# ----------------------------------------------------------------------------------------- signatures
def signature(secret: str, timestamp: int, body: bytes) -> str:
    """`v1=` and the hex HMAC-SHA256 of "<timestamp>." + body under the endpoint's secret."""
    digest = hmac.new(secret.encode("utf-8"), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"v1={digest}"


def verify(
    secret: str, body: bytes, headers: Mapping[str, str], now: float, tolerance_s: float = REPLAY_TOLERANCE_S
) -> bool:
    """What a receiver does: the signature matches the raw body and the timestamp is recent."""
    lowered = {name.lower(): value for name, value in headers.items()}
    try:
        timestamp = int(lowered[TIMESTAMP_HEADER.lower()])
        presented = lowered[SIGNATURE_HEADER.lower()]
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    return hmac.compare_digest(presented, signature(secret, timestamp, body))


def signed_headers(alert: Alert, secret: str, now: float) -> dict[str, str]:
    timestamp = int(now)
    return {
        "Content-Type": "application/json",
        ID_HEADER: alert.alert_id,
        TIMESTAMP_HEADER: str(timestamp),
        SIGNATURE_HEADER: signature(secret, timestamp, alert.payload.encode("utf-8")),
    }


# ------------------------------------------------------------------------------------------- retries
def retry_delay(attempts: int, base_s: float, max_s: float) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling from `base_s`, at most
    `max_s`, less up to a fifth at random so many alerts to one receiver that comes back do not all
    arrive in the same second."""
    delay = min(max_s, base_s * 2.0 ** max(attempts - 1, 0))
    return delay * random.uniform(0.8, 1.0)


def age_s(alert: Alert, now: float) -> float:
    return now - datetime.fromisoformat(alert.created).timestamp()


# ---------------------------------------------------------------------------------------- what fires
@dataclass(frozen=True)
class AlertPlanner:
    """Turns a confirmation or a batch of verdicts into the outbox rows it raises."""

    endpoints: EndpointStore
    keys: KeyStore
    holders_see_stations: bool  # VERITY_RIGHTHOLDER_SEES_STATIONS, as GET /v1/history applies it

    def holders_of(self, product: str | None) -> list[str]:
        """The right holders whose active keys name the product."""
        if product is None:
            return []
        return sorted({key.station_id for key in self.keys.list_keys()
                       if key.active and key.role == RIGHTHOLDER and product in key.products})  # fmt: skip

    def for_confirmation(self, record: AuditRecord, feedback: FeedbackRecord) -> list[Alert]:
        """A confirmed counterfeit: one alert to each owner's endpoint and the agency's."""
        if feedback.confirmed_label != COUNTERFEIT:
            return []
        endpoints = self.endpoints.endpoints()
        targets = [endpoints[name] for name in self.holders_of(record.product) if name in endpoints]
        if AGENCY in endpoints:
            targets.append(endpoints[AGENCY])
        return [self._alert(CONFIRMED, endpoint, record, feedback) for endpoint in targets]

    def for_verdicts(self, records: Iterable[AuditRecord]) -> list[Alert]:
        """Counterfeit verdicts, to the endpoints that asked for every alarm."""
        endpoints = [e for e in self.endpoints.endpoints().values() if e.on_alarm]
        if not endpoints:
            return []
        alerts = []
        for record in records:
            if record.verdict != COUNTERFEIT:
                continue
            owners = set(self.holders_of(record.product))
            targets = [e for e in endpoints if e.is_agency or e.name in owners]
            alerts += [self._alert(ALARM, endpoint, record, None) for endpoint in targets]
        return alerts

    def _alert(
        self, event: str, endpoint: AlertEndpoint, record: AuditRecord, feedback: FeedbackRecord | None
    ) -> Alert:
        alert_id = hashlib.sha256(f"{event}\0{record.request_id}\0{endpoint.name}".encode()).hexdigest()[:32]
        created = utc_now()
        body = payload(alert_id, event, created, record, feedback,
                       endpoint.is_agency or self.holders_see_stations)  # fmt: skip
        return Alert(
            alert_id=alert_id,
            created=created,
            event=event,
            endpoint=endpoint.name,
            request_id=record.request_id,
            payload=json.dumps(body, separators=(",", ":"), ensure_ascii=False),
        )


def payload(
    alert_id: str,
    event: str,
    created: str,
    record: AuditRecord,
    feedback: FeedbackRecord | None,
    with_station: bool,
) -> dict[str, Any]:
    """The alert's JSON body: the verdict as the audit log holds it, the confirmation, and the station
    and case only where the receiver may see them (the agency always; a right holder when the agency
    lets it)."""
    body: dict[str, Any] = {
        "id": alert_id,
        "event": event,
        "created": created,
        "product": record.product,
        "request_id": record.request_id,
        "verdict": {
            "verdict": record.verdict,
            "score": record.score,
            "modality": record.modality,
            "model": {"name": record.model_name, "version": record.model_version},
            "created": record.created,
            "reference_status": record.reference_status,
        },
        "confirmation": None,
        "station_id": record.station_id if with_station else None,
        "case_id": record.case_id if with_station else None,
    }
    if feedback is not None:
        body["confirmation"] = {
            "label": feedback.confirmed_label,
            "created": feedback.created,
            "role": feedback.role,
            "case_id": feedback.case_id if with_station else None,
        }
    return body
