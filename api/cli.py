"""`verity serve`, `verity keys` and `verity audit`: each parses its own argv and returns an exit code."""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from verity.api.audit import AUDIT_FIELDS, AuditStore, open_audit_store
from verity.api.auth import RIGHTHOLDER, KeyStore
from verity.api.feedback import export_confirmed
from verity.api.settings import Settings, is_loopback, load_settings
from verity.inference.terminal import terminal_json, terminal_safe
from verity.inference.vocabulary import MODALITIES


def limit_malloc_arenas(count: int) -> bool:
    """Caps glibc's malloc arenas in this process (mallopt) and in worker processes (environment).

    Returns False where the C library is not glibc (nothing to do there)."""
    if count <= 0:
        return False
    os.environ.setdefault("MALLOC_ARENA_MAX", str(count))  # read by spawned workers at their start
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_arena_max = -8  # from glibc's malloc.h
        return bool(libc.mallopt(m_arena_max, count))
    except (OSError, AttributeError):
        return False


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="verity serve", description="Run the Verity HTTP service.")
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (non-loopback requires API keys)"
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--workers", type=int, default=1, help="worker processes (each loads the models)")
    parser.add_argument("--config", help="settings file (KEY=VALUE lines, VERITY_ prefix)")
    parser.add_argument("--models-dir", help="folder of <name>/<version>/model.onnx (default checkpoints)")
    parser.add_argument("--require-api-keys", action="store_true", help="require keys even on loopback")
    parser.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    return parser


WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _serving_environment(settings: Settings, host: str) -> dict[str, str]:
    """What every worker must agree on: the models folder as resolved here (./checkpoints or the shipped
    defaults), and the Host names answered: the configured ones plus the bound address."""
    hosts = list(settings.allowed_hosts)
    bound = f"[{host}]" if ":" in host else host
    if host not in WILDCARD_BINDS and "*" not in hosts and bound not in hosts:
        hosts.append(bound)
    return {"VERITY_MODELS_DIR": str(settings.models_dir.absolute()), "VERITY_ALLOWED_HOSTS": ",".join(hosts)}


def _announce(environment: dict[str, str], host: str) -> None:
    """The start-up line an operator reads first: where models come from, which Host names answer."""
    hosts = environment["VERITY_ALLOWED_HOSTS"]
    wildcard = (
        f"; bound to {host or 'all addresses'}: add the names clients use to VERITY_ALLOWED_HOSTS"
        if host in WILDCARD_BINDS
        else ""
    )
    logging.getLogger("verity.api").info(
        f"serving models from {environment['VERITY_MODELS_DIR']} (set VERITY_MODELS_DIR or --models-dir "
        f"to change); answering Host {hosts} (VERITY_ALLOWED_HOSTS){wildcard}",
        extra={"models_dir": environment["VERITY_MODELS_DIR"], "allowed_hosts": hosts.split(",")},
    )


def worker_environment(args: argparse.Namespace) -> dict[str, str]:
    """The VERITY_* choices of the command line: worker processes build the app from the environment, so
    every choice made here goes there too."""
    environment = {"VERITY_SERVE_PROCESS": "1"}
    if args.config:
        environment["VERITY_CONFIG"] = str(Path(args.config).resolve())
    if args.models_dir:
        environment["VERITY_MODELS_DIR"] = args.models_dir
    if args.log_level:
        environment["VERITY_LOG_LEVEL"] = args.log_level
    if args.require_api_keys or not is_loopback(args.host):
        environment["VERITY_REQUIRE_API_KEYS"] = "true"
    if args.workers > 1:
        environment["VERITY_WORKER_PROCESSES"] = str(args.workers)  # each runs its share of the cores
        if "VERITY_SHARED_LIMITS" not in os.environ:
            environment["VERITY_SHARED_LIMITS"] = "true"  # a key's rate holds across the workers
    return environment


def _refuse_without_keys(settings: Settings, host: str) -> None:
    reason = f"binding the non-loopback address {host}" if not is_loopback(host) else "--require-api-keys"
    print(
        f"verity serve: refusing to start: {reason} requires API keys, and {settings.keys_file} has no "
        "active key. Create one with `verity keys add --station <id>`, or bind 127.0.0.1.",
        file=sys.stderr,
    )


def serve_main(argv: list[str]) -> int:
    """Runs uvicorn with the app factory; refuses a non-loopback bind without any API key."""
    args = _serve_parser().parse_args(argv)
    if not 1 <= args.workers <= 64:
        print("verity serve: --workers must lie between 1 and 64.", file=sys.stderr)
        return 2
    environment = worker_environment(args)
    overrides = {
        k.removeprefix("VERITY_").lower(): v
        for k, v in environment.items()
        if k not in ("VERITY_SERVE_PROCESS", "VERITY_CONFIG")
    }
    settings = load_settings(environment.get("VERITY_CONFIG"), **overrides)  # validated before uvicorn starts
    if settings.require_api_keys and KeyStore(settings.keys_file).active_count() == 0:
        _refuse_without_keys(settings, args.host)
        return 2
    from verity.api.logs import configure_logging

    environment.update(_serving_environment(settings, args.host))
    os.environ.update(environment)
    limit_malloc_arenas(settings.malloc_arena_max)
    configure_logging(settings.log_level, settings.log_json)
    _announce(environment, args.host)
    with _balance_folder(args.workers > 1 and settings.balance_connections) as balance_dir:
        if balance_dir is not None:
            os.environ["VERITY_CONNECTION_BALANCE_DIR"] = balance_dir
        _run_uvicorn(args, settings)
    return 0


@contextlib.contextmanager
def _balance_folder(wanted: bool) -> Iterator[str | None]:
    """A private folder where the workers count their connections (api/connection_balance.py); removed
    when the server stops."""
    if not wanted:
        yield None
        return
    folder = tempfile.mkdtemp(prefix="verity-balance-")  # mode 0700: only this user's workers reach it
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_uvicorn(args: argparse.Namespace, settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        "verity.api.app:create_app",
        factory=True,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_config=None,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
        access_log=False,
        server_header=False,  # no "server: uvicorn" banner telling a scanner what to try
        **_connection_options(settings),
    )


def _connection_options(settings: Settings) -> dict[str, Any]:
    """uvicorn's side of slow and many clients: its HTTP protocol with a deadline for the request head
    (a name, so worker processes import it), idle keep-alive, and the connections plus requests one
    worker holds at once (past it uvicorn answers 503). The body's deadline is the app's middleware."""
    return {
        "http": "verity.api.http_protocol:HeadDeadlineProtocol",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        "limit_concurrency": settings.max_concurrency,
    }


def keys_main(argv: list[str]) -> int:
    """`verity keys add --station ID [--admin] | add --rightholder NAME --products A,B | revoke KEY_ID |
    list`: the server sees changes at once."""
    parser = argparse.ArgumentParser(prog="verity keys", description="Manage station API keys.")
    parser.add_argument("--keys-file", help="key file (default: VERITY_KEYS_FILE or var/keys.json)")
    sub = parser.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="create a key; it is printed once and stored only as a hash")
    who = add.add_mutually_exclusive_group(required=True)
    who.add_argument("--station", help="the station the key speaks for")
    who.add_argument("--rightholder", metavar="NAME", help="a right holder: its products' references and "
                     "seizures only (give --products)")  # fmt: skip
    add.add_argument("--admin", action="store_true", help="may also reload models")
    add.add_argument("--products", help="a right holder's products, comma-separated")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    sub.add_parser("list", help="list keys (ids, stations, roles; never secrets)")
    args = parser.parse_args(argv)
    store = KeyStore(args.keys_file or load_settings().keys_file)
    if args.action == "add":
        products = tuple(p.strip() for p in (args.products or "").split(",") if p.strip())
        if args.rightholder and args.admin:
            parser.error("a right holder's key is never an admin's")
        if args.station and products:
            parser.error("--products is for a right holder's key (--rightholder NAME)")
        role = RIGHTHOLDER if args.rightholder else "admin" if args.admin else "station"
        try:
            record, secret = store.add(args.rightholder or args.station, role, products)
        except ValueError as error:
            parser.error(str(error))
        print(
            terminal_safe(
                f"key id {record.key_id} for station {record.station_id} ({record.role}); store it now, "
                "it is not shown again:"
            ),
            file=sys.stderr,
        )
        print(secret)
    elif args.action == "revoke":
        record = store.revoke(args.key_id)
        print(terminal_safe(f"revoked key {record.key_id} (station {record.station_id})"))
    else:
        for key in store.list_keys():
            state = f"revoked {key.revoked}" if key.revoked else "active"
            state += f"  products {','.join(key.products)}" if key.products else ""
            line = f"{key.key_id}  {key.station_id:<20} {key.role:<11} created {key.created}  {state}"
            print(terminal_safe(line))
    return 0


def _parse_since(text: str | None) -> str | None:
    """ISO 8601 date or time; naive times are UTC. Returned normalized for string comparison."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise ValueError(
            f"--since {text!r} is not an ISO 8601 date or time (e.g. 2026-11-29T08:00)."
        ) from error
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def audit_main(argv: list[str]) -> int:
    """`verity audit export --since T --format csv|jsonl [--out FILE]`, `verity audit confirmed --out DIR`,
    `verity audit migrate --from SQLITE [--to postgresql://...]`."""
    parser = argparse.ArgumentParser(prog="verity audit", description="Read the audit log.")
    sub = parser.add_subparsers(dest="action", required=True)
    export = sub.add_parser("export", help="write audit records as CSV or JSONL")
    export.add_argument("--since", help="ISO 8601 date or time (UTC unless it says otherwise)")
    export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    export.add_argument("--out", default="-", help="output file (default: standard output)")
    confirmed = sub.add_parser(
        "confirmed",
        help="write officers' confirmed cases with their stored images for `verity data ingest`",
    )
    confirmed.add_argument("--out", required=True, type=Path, help="folder for confirmed.jsonl and images/")
    confirmed.add_argument("--modality", choices=list(MODALITIES), help="only this modality")
    for action in (export, confirmed):
        action.add_argument("--db", help="audit database: a SQLite path or a postgresql:// URL (default: "
                            "VERITY_AUDIT_DB, var/audit.sqlite)")
    migrate = sub.add_parser("migrate", help="copy a SQLite audit log into PostgreSQL and check the copy")
    migrate.add_argument("--from", dest="source", required=True, help="the SQLite audit database")
    migrate.add_argument("--to", dest="target", help="postgresql:// URL (default: VERITY_AUDIT_DB)")
    args = parser.parse_args(argv)
    if args.action == "migrate":
        return _migrate(args.source, args.target or load_settings().audit_db)
    settings = load_settings(**({"audit_db": args.db} if args.db else {}))
    if "://" not in settings.audit_db and not Path(settings.audit_db).is_file():
        raise FileNotFoundError(f"No audit database at {settings.audit_db}.")
    store = open_audit_store(settings)
    try:
        return _export_confirmed(store, args) if args.action == "confirmed" else _export_records(store, args)
    finally:
        store.close()


def _migrate(source_path: str, target_url: str) -> int:
    """`verity audit migrate`: copies, checks every table, prints the counts and digests."""
    from verity.api.audit import POSTGRES_SCHEMES, SQLiteAuditStore, open_postgres_store
    from verity.api.audit_migrate import migrate

    if not Path(source_path).is_file():
        raise FileNotFoundError(f"No audit database at {source_path}.")
    if target_url.split("://", 1)[0].lower() not in POSTGRES_SCHEMES:
        raise ValueError("--to (or VERITY_AUDIT_DB) must be a postgresql:// URL to migrate into.")
    source = SQLiteAuditStore(source_path)
    target = open_postgres_store(target_url, max_connections=2)
    try:
        checks = migrate(source, target)
    finally:
        source.close()
        target.close()
    for check in checks:
        digest = check.target_sha256[:16]
        print(f"{check.table}: {check.target_rows} rows, sha256 {digest}... (equal to the source)")
    return 0


# A cell starting with one of these is read as a formula by spreadsheets (OWASP: CSV injection), so a
# case_id of =HYPERLINK(...) would run when an auditor opens the export.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_cell(value: object) -> object:
    """A CSV cell a spreadsheet shows as text: a string starting like a formula gets a leading single
    quote (OWASP's advice); numbers and everything else are written as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_cell(value: object, to_terminal: bool) -> object:
    """One cell of the CSV export: safe in a spreadsheet, and on a terminal when printed there."""
    cell = spreadsheet_cell(value)
    return terminal_safe(cell) if to_terminal and isinstance(cell, str) else cell


def _export_records(store: AuditStore, args: argparse.Namespace) -> int:
    since = _parse_since(args.since)
    handle = sys.stdout if args.out == "-" else open(args.out, "w", encoding="utf-8", newline="")  # noqa: SIM115
    count = 0
    try:
        writer = csv.DictWriter(handle, fieldnames=AUDIT_FIELDS) if args.format == "csv" else None
        if writer:
            writer.writeheader()
        to_terminal = handle is sys.stdout  # case ids, stations and names are the clients' own text
        for record in store.since(since):
            row = asdict(record)
            if writer:
                writer.writerow({name: csv_cell(value, to_terminal) for name, value in row.items()})
            else:
                handle.write((terminal_json(row) if to_terminal else json.dumps(row)) + "\n")
            count += 1
    finally:
        if handle is not sys.stdout:
            handle.close()
    print(f"exported {count} audit records", file=sys.stderr)
    return 0


def _export_confirmed(store: AuditStore, args: argparse.Namespace) -> int:
    result = export_confirmed(store, args.out, args.modality)
    for line in result.summary():
        print(line, file=sys.stderr)
    print(f"next: verity data ingest {result.table} --out MANIFEST.jsonl", file=sys.stderr)
    return 0
