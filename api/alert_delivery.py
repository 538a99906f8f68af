"""Sends the outbox's alerts: a thread beside the server, so no answer ever waits for a receiver.

Each round claims the due alerts for a lease (api/audit_records.AuditStore.claim_alerts: every worker of
a box, and every box on one PostgreSQL store, runs a dispatcher, and a claimed alert is sent by one),
POSTs each, signed, to its endpoint, and logs the attempt with the alert's new state in one transaction:
delivered on a 2xx, else pending again after a doubling delay (api.alerts.retry_delay), or failed once
it is older than VERITY_ALERT_GIVE_UP_AFTER_S (`verity alerts retry` sends it again). A dispatcher that
dies holding a claim lets it go when the lease ends. A round starts every second, and at once when a
confirmation in this process raised an alert.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter

from verity import __version__
from verity.api.alert_endpoints import EndpointStore
from verity.api.alerts import AlertPlanner, age_s, retry_delay, signed_headers
from verity.api.audit_records import Alert, AlertDelivery, AuditError, AuditStore
from verity.api.settings import Settings
from verity.inference.stamps import utc_now

log = logging.getLogger("verity.api.alerts")
POLL_S = 1.0
BATCH = 10  # alerts claimed in one round
ERROR_MAX = 300  # characters of a receiver's error kept in the delivery log


@dataclass(frozen=True)
class DeliveryOptions:
    timeout_s: float = 5.0
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    give_up_after_s: float = 86_400.0

    @classmethod
    def from_settings(cls, settings: Settings) -> DeliveryOptions:
        return cls(
            timeout_s=settings.alert_timeout_s,
            retry_base_s=settings.alert_retry_base_s,
            retry_max_s=settings.alert_retry_max_s,
            give_up_after_s=settings.alert_give_up_after_s,
        )

    @property
    def lease_s(self) -> float:
        """Long enough to send a whole claimed batch to receivers that each take the full timeout."""
        return BATCH * self.timeout_s + 30.0


def alert_attempts(registry: CollectorRegistry) -> Counter:
    """The attempts' counter, registered once per app (api.metrics) and counted by the dispatcher."""
    return Counter(
        "verity_alert_attempts_total",
        "Seizure alert delivery attempts by endpoint and what became of the alert (delivered; pending: "
        "to be retried; failed: given up, `verity alerts retry` sends it again).",
        ["endpoint", "outcome"],
        registry=registry,
    )


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is the receiver's answer, not a place to send a signed alert to."""

    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


_OPENER = urllib.request.build_opener(_NoRedirect)


def post(url: str, body: bytes, headers: dict[str, str], timeout_s: float) -> tuple[int | None, str | None]:
    """(HTTP status, error): the status whatever it is, or None and why the receiver was not reached."""
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={**headers, "User-Agent": f"Verity/{__version__}"})  # fmt: skip
    try:
        with _OPENER.open(request, timeout=timeout_s) as response:
            return int(response.status), None
    except urllib.error.HTTPError as error:  # a status outside 2xx (a 3xx too: not followed)
        return int(error.code), f"HTTP {error.code}"
    except (urllib.error.URLError, OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        return None, f"{type(reason).__name__}: {reason}"[:ERROR_MAX]


class AlertDispatcher:
    """The delivery thread of one server process."""

    def __init__(
        self,
        store: AuditStore,
        endpoints: EndpointStore,
        options: DeliveryOptions,
        on_attempt: Callable[[str, str], None] | None = None,
    ) -> None:
        self.store = store
        self.endpoints = endpoints
        self.options = options
        self.on_attempt = on_attempt  # (endpoint, outcome) of each attempt: the server counts them
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="verity-alerts", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stops after the alert being sent (its claim lapses if that takes longer than `timeout_s`)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def wake(self) -> None:
        """A new alert is in the outbox: send it now rather than at the next round."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.deliver_due(time.time())
            except AuditError as error:  # the store is away: try again next round, the alerts stay
                log.warning("alert outbox unreadable", extra={"error": str(error)})
                sent = 0
            if sent < BATCH:  # a full batch: more may be due, go on at once
                self._wake.wait(POLL_S)
                self._wake.clear()

    def deliver_due(self, now: float) -> int:
        """One round: claims the due alerts and makes one attempt at each; how many were attempted."""
        claimed = self.store.claim_alerts(now, self.options.lease_s, BATCH)
        for alert in claimed:
            if self._stop.is_set():
                break  # the rest keep their claim until the lease ends, then another takes them
            self.attempt(alert, now)
        return len(claimed)

    def attempt(self, alert: Alert, now: float) -> str:
        """Sends one alert and records the attempt; its new status, decided at `now` (the round's
        clock: the next attempt is due a delay after it, and the alert's age is taken at it)."""
        endpoint = self.endpoints.get(alert.endpoint)
        started = time.time()
        status_code: int | None
        error: str | None
        if endpoint is None:
            status_code, error = None, f"no alert endpoint named {alert.endpoint!r} (removed?)"
        else:
            headers = signed_headers(alert, endpoint.secret, started)
            body = alert.payload.encode("utf-8")
            status_code, error = post(endpoint.url, body, headers, self.options.timeout_s)
        finished = time.time()
        delivered = status_code is not None and 200 <= status_code < 300
        delivery = AlertDelivery(
            alert_id=alert.alert_id,
            attempted=utc_now(),
            attempt=alert.attempts + 1,
            status_code=status_code,
            error=None if delivered else error,
            duration_ms=round((finished - started) * 1000.0, 3),
        )
        status, next_attempt = self._outcome(alert, delivered, now)
        self.store.finish_attempt(delivery, status, next_attempt)
        if self.on_attempt is not None:
            self.on_attempt(alert.endpoint, status)
        log.info("alert attempt", extra={
            "alert_id": alert.alert_id, "endpoint": alert.endpoint, "status": status,
            "status_code": status_code, "error": error,
        })  # fmt: skip
        return status

    def _outcome(self, alert: Alert, delivered: bool, now: float) -> tuple[str, float]:
        if delivered:
            return "delivered", now
        if age_s(alert, now) > self.options.give_up_after_s:
            return "failed", now
        options = self.options
        return "pending", now + retry_delay(alert.attempts + 1, options.retry_base_s, options.retry_max_s)


@dataclass(frozen=True)
class Outbox:
    """What a route that raises alerts needs: which alerts a write raises, and the dispatcher to wake
    once they are committed (None before the lifespan starts it)."""

    planner: AlertPlanner
    dispatcher: AlertDispatcher | None

    def written(self, alerts: list[Alert]) -> None:
        if alerts and self.dispatcher is not None:
            self.dispatcher.wake()
