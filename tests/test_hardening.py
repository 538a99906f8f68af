"""Issue 13's hostile suite in CI: every row of its table against a live, keys-required server.

The suite itself is `benchmarks/hostile_attacks.py` (run it by hand against any server with
`benchmarks/hostile_server.py`). Here it runs on the tiny models with 2-second connection deadlines, so a
slowloris is cut off in seconds rather than the default ten. The defences' details are tested beside
it: test_decode_budgets, test_protocol_hygiene, test_feedback_integrity, test_connections, test_exposure.
"""

from __future__ import annotations

import pytest
from api_fixtures import LiveServer, server_env

from benchmarks.hostile_attacks import Target, run_suite
from benchmarks.hostile_server import STATIONS, print_rows
from verity.api.auth import KeyStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hardening")
    store = KeyStore(root / "keys.json")
    keys = {name: store.add(station)[1] for name, station in STATIONS.items()}
    keys["admin"] = store.add("ops", role="admin")[1]
    env = server_env(
        root, VERITY_REQUIRE_API_KEYS="true", VERITY_HEADER_TIMEOUT_S="2", VERITY_BODY_TIMEOUT_S="2"
    )
    live = LiveServer(env).start()
    yield Target(url=live.url, keys=keys, pid=live.process.pid, audit_db=root / "audit.sqlite")
    live.stop()


def test_every_row_of_the_table_keeps_its_bound(target: Target, capsys: pytest.CaptureFixture[str]) -> None:
    rows = run_suite(target)
    print_rows(rows)
    report = capsys.readouterr().out
    assert len(rows) >= 23 and all(row.ok for row in rows), report
    assert all(not row.status.startswith("5") for row in rows), report
