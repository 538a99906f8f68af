"""Issue 13's hostile suite against a live server: every row of its table, with the bounds it set.

    .venv/bin/python benchmarks/hostile_server.py
        starts `verity serve` on the shipped models with API keys required, in a scratch folder
    .venv/bin/python benchmarks/hostile_server.py --url http://127.0.0.1:8000 \
        --key-a KEY --key-b KEY --key-c KEY --key-d KEY --admin-key KEY
        a running server (four station keys and an admin key; no RSS or file checks then)

Each attack prints one line: what was sent, the status, seconds, the server's RSS growth, and whether
it kept its bound. Bounds: every bomb answered in <= 2 s with <= 300 MB RSS growth and never a 5xx;
while two bombs from one key are in flight, another key's ordinary predicts keep p99 <= 1 s; a slow
client is cut off in <= 15 s. Exits 1 when any row misses. `tests/test_hardening.py` runs the same suite
in CI on the tiny models; the details of each defence are tested beside it (test_decode_budgets,
test_protocol_hygiene, test_feedback_integrity, test_connections, test_exposure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hostile_attacks import Row, Target, run_suite  # noqa: E402
from benchmarks.load_test import start_server  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
STATIONS = {"a": "hostile-a", "b": "ordinary-b", "c": "burst-c", "d": "protocol-d"}


def _own_server(workdir: Path) -> tuple[object, Target]:
    """A keys-required server on the shipped models, its three station keys and an admin key."""
    from verity.api.auth import KeyStore

    store = KeyStore(workdir / "keys.json")
    keys = {name: store.add(station)[1] for name, station in STATIONS.items()}
    keys["admin"] = store.add("ops", role="admin")[1]
    process, url = start_server(
        str(REPO / "checkpoints"), workdir, {"VERITY_REQUIRE_API_KEYS": "true", "VERITY_LOG_LEVEL": "error"}
    )
    target = Target(url=url, keys=keys, pid=process.pid, audit_db=workdir / "audit.sqlite")
    return process, target


def print_rows(rows: list[Row]) -> None:
    width = max(len(row.attack) for row in rows)
    for row in rows:
        rss = f"{row.rss_mb:+7.0f} MB" if row.rss_mb is not None else "      n/a"
        verdict = "ok  " if row.ok else "MISS"
        print(f"{verdict} {row.attack:<{width}}  {row.status:>9}  {row.seconds:6.2f} s  {rss}  {row.detail}")
    missed = [row.attack for row in rows if not row.ok]
    print(
        f"\n{len(rows) - len(missed)} of {len(rows)} rows kept their bounds"
        + (f"; missed: {missed}" if missed else "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="a running server (default: start one on the shipped models)")
    parser.add_argument("--key-a", help="station key that sends the hostile requests")
    parser.add_argument("--key-b", help="another station's key, sending ordinary predicts")
    parser.add_argument("--key-c", help="a third station's key, for the rate-limit burst")
    parser.add_argument("--key-d", help="a fourth station's key, for the protocol attacks")
    parser.add_argument("--admin-key", help="an admin key")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        process = None
        if args.url:
            keys = {
                "a": args.key_a,
                "b": args.key_b,
                "c": args.key_c,
                "d": args.key_d,
                "admin": args.admin_key,
            }
            if not all(keys.values()):
                parser.error("--url needs --key-a, --key-b, --key-c, --key-d and --admin-key")
            target = Target(url=args.url.rstrip("/"), keys=keys)
        else:
            process, target = _own_server(Path(scratch))
        try:
            rows = run_suite(target)
        finally:
            if process is not None:
                process.terminate()  # type: ignore[attr-defined]
    print_rows(rows)
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=1))
    return 0 if all(row.ok for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
