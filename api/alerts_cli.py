"""`verity alerts`: the seizure alerts' endpoints, the outbox and its delivery log.

    verity alerts endpoint add --rightholder ACME --url https://... [--on-alarm]   prints the secret once
    verity alerts endpoint add --agency --url https://...
    verity alerts endpoint list | remove NAME
    verity alerts list [--status pending|delivered|failed] [--limit N] [--json]
    verity alerts show ALERT_ID        the alert, its body and every attempt
    verity alerts retry ALERT_ID ... | --failed

The server reads the endpoints file again when it changes, and every worker sends from the one outbox
in the audit store, so none of these needs a restart.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path

from verity.api.alert_endpoints import AGENCY, EndpointStore
from verity.api.audit import AuditStore, open_audit_store
from verity.api.audit_records import ALERT_STATUSES, Alert
from verity.api.settings import Settings, load_settings
from verity.inference.terminal import terminal_safe

LIST_MAX = 10_000


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verity alerts", description="Seizure alerts to right holders.")
    parser.add_argument("--db", help="audit database (default: VERITY_AUDIT_DB, var/audit.sqlite)")
    parser.add_argument("--endpoints-file", help="default: VERITY_ALERT_ENDPOINTS_FILE")
    sub = parser.add_subparsers(dest="action", required=True)
    endpoint = sub.add_parser("endpoint", help="where alerts go, and the secret that signs them")
    endpoints = endpoint.add_subparsers(dest="endpoint_action", required=True)
    add = endpoints.add_parser("add", help="add or replace an endpoint; prints its new secret once")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--rightholder", metavar="NAME", help="the right holder's name, as on its keys")
    who.add_argument("--agency", action="store_true", help="the agency's own endpoint (every seizure)")
    add.add_argument("--url", required=True, help="https URL the alerts are POSTed to")
    add.add_argument("--on-alarm", action="store_true", help="also every counterfeit verdict, unconfirmed")
    add.add_argument("--allow-http", action="store_true", help="plain http to a non-loopback host")
    remove = endpoints.add_parser("remove", help="remove an endpoint (its pending alerts then fail)")
    remove.add_argument("name")
    endpoints.add_parser("list", help="the endpoints (never their secrets)")
    listing = sub.add_parser("list", help="the newest alerts first")
    listing.add_argument("--status", choices=ALERT_STATUSES)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--json", action="store_true", help="one JSON object a line")
    show = sub.add_parser("show", help="one alert, its body and its delivery log")
    show.add_argument("alert_id")
    retry = sub.add_parser("retry", help="send failed alerts (or the named ones) again, now")
    retry.add_argument("alert_ids", nargs="*", metavar="ALERT_ID")
    retry.add_argument("--failed", action="store_true", help="every failed alert")
    return parser


def alerts_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    overrides = {"audit_db": args.db} if args.db else {}
    if args.endpoints_file:
        overrides["alert_endpoints_file"] = args.endpoints_file
    settings = load_settings(**overrides)
    if args.action == "endpoint":
        return _endpoint(parser, args, EndpointStore(settings.alert_endpoints_file))
    if args.action == "list" and not 1 <= args.limit <= LIST_MAX:
        parser.error(f"--limit must be between 1 and {LIST_MAX}")
    if args.action == "retry" and bool(args.alert_ids) == args.failed:
        parser.error("name the alerts to send again, or give --failed (not both)")
    store = _open_store(settings)
    try:
        if args.action == "list":
            return _list(store, args.status, args.limit, args.json)
        if args.action == "show":
            return _show(store, args.alert_id)
        changed = store.retry_alerts(None if args.failed else args.alert_ids, time.time())
        print(f"{changed} alert(s) will be sent again by the running server within a second")
        return 0 if changed or args.failed else 1
    finally:
        store.close()


def _open_store(settings: Settings) -> AuditStore:
    path = settings.audit_db.removeprefix("sqlite:///")
    if "://" not in path and not Path(path).is_file():
        raise FileNotFoundError(f"No audit database at {settings.audit_db}.")
    return open_audit_store(settings)


def _endpoint(parser: argparse.ArgumentParser, args: argparse.Namespace, store: EndpointStore) -> int:
    if args.endpoint_action == "add":
        name = AGENCY if args.agency else args.rightholder
        if args.rightholder == AGENCY:
            parser.error(f"{AGENCY!r} names the agency's endpoint: use --agency")
        try:
            endpoint = store.add(name, args.url, on_alarm=args.on_alarm, allow_http=args.allow_http)
        except ValueError as error:
            parser.error(str(error))
        print(terminal_safe(f"alerts for {endpoint.name} go to {endpoint.url}; give the receiver this "
                            "secret now, it is not shown again:"), file=sys.stderr)  # fmt: skip
        print(endpoint.secret)
    elif args.endpoint_action == "remove":
        removed = store.remove(args.name)
        print(terminal_safe(f"removed the alert endpoint of {removed.name} ({removed.url})"))
    else:
        for endpoint in store.endpoints().values():
            events = "confirmed seizures and alarms" if endpoint.on_alarm else "confirmed seizures"
            print(terminal_safe(f"{endpoint.name:<20} {endpoint.url}  {events}  created {endpoint.created}"))
    return 0


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")


def _line(alert: Alert) -> str:
    state = alert.status
    if alert.status == "pending":
        state += f", next attempt {_when(alert.next_attempt)}"
    if alert.last_error and alert.status != "delivered":
        state += f", last error: {alert.last_error}"
    return (f"{alert.alert_id}  {alert.created[:19]}  {alert.event:<17} {alert.endpoint:<16} "
            f"request {alert.request_id}  attempts {alert.attempts}  {state}")  # fmt: skip


def _list(store: AuditStore, status: str | None, limit: int, as_json: bool) -> int:
    for alert in store.alerts(status, limit):
        print(json.dumps(asdict(alert)) if as_json else terminal_safe(_line(alert)))
    return 0


def _show(store: AuditStore, alert_id: str) -> int:
    alert = store.alert(alert_id)
    if alert is None:
        print(terminal_safe(f"verity alerts: no alert {alert_id!r}"), file=sys.stderr)
        return 1
    print(terminal_safe(_line(alert)))
    print(terminal_safe(alert.payload))
    for delivery in store.alert_deliveries(alert_id):
        outcome = f"HTTP {delivery.status_code}" if delivery.status_code is not None else "not reached"
        error = f"  {delivery.error}" if delivery.error else ""
        print(terminal_safe(f"  attempt {delivery.attempt}  {delivery.attempted[:19]}  {outcome}  "
                            f"{delivery.duration_ms:.0f} ms{error}"))  # fmt: skip
    return 0
