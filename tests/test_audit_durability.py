"""No verdict is lost when a worker dies: `verity serve --workers 2` on a PostgreSQL audit store, one
worker killed with SIGKILL in the middle of a load; every request answered 200 is in the audit exactly
once (each verdict is committed before it is returned, so a dead worker can only lose unanswered work).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_fixtures import LiveServer, image_bytes, server_env
from postgres_fixtures import PostgresServer, require_postgres, start_postgres

pytestmark = pytest.mark.slow
CLIENTS, REQUESTS = 4, 30


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres(require_postgres())
    yield server
    server.stop()


def worker_pids(supervisor: int) -> list[int]:
    """The server's worker processes: the supervisor's children that multiprocessing spawned to serve
    (not its resource tracker), from /proc."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    commands = {int(pid): Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ") for pid in children}
    return [pid for pid, command in commands.items() if b"spawn_main" in command]


def load(url: str, answered: list[str], failed: list[str]) -> None:
    """REQUESTS predicts, each on a new connection; the request ids of the 200s, the failures apart."""
    for number in range(REQUESTS):
        try:
            image = {"file": ("a.png", image_bytes(number % 256), "image/png")}
            response = httpx.post(url + "/v1/predict", timeout=30, data={"modality": "photo"}, files=image)
        except httpx.HTTPError as error:  # the killed worker's connections
            failed.append(type(error).__name__)
            continue
        if response.status_code == 200:
            answered.append(response.json()["request_id"])
        else:
            failed.append(str(response.status_code))


def test_a_worker_killed_under_load_loses_no_answered_verdict(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    import psycopg

    url = postgres.create_database("durability")
    env = server_env(tmp_path, VERITY_AUDIT_DB=url, VERITY_RATE_LIMIT_PER_S="0")
    live = LiveServer(env, ["--workers", "2"]).start(timeout=120)
    answered: list[str] = []
    failed: list[str] = []
    try:
        assert live.process is not None
        clients = [threading.Thread(target=load, args=(live.url, answered, failed)) for _ in range(CLIENTS)]
        for client in clients:
            client.start()
        time.sleep(1.0)  # mid-load
        victims = worker_pids(live.process.pid)
        assert len(victims) == 2
        os.kill(victims[0], signal.SIGKILL)
        for client in clients:
            client.join(timeout=120)
    finally:
        live.stop()
    assert len(answered) > CLIENTS * REQUESTS // 2, (len(answered), failed)
    with psycopg.connect(url) as connection:
        rows = connection.execute(
            "SELECT request_id, count(*) FROM predictions WHERE request_id = ANY(%s) GROUP BY request_id",
            (answered,),
        ).fetchall()
    assert dict(rows) == dict.fromkeys(answered, 1)  # every 200 audited, exactly once
