"""kill -9 during load: after a restart, every request that got a 200 is in the audit log."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from api_fixtures import LiveServer, image_bytes, server_env

from verity.api.audit import SQLiteAuditStore

pytestmark = pytest.mark.slow


def test_every_200_survives_kill_9(tmp_path) -> None:
    env = server_env(tmp_path, VERITY_RATE_LIMIT_PER_S="0")  # full load from one caller: not 429s
    server = LiveServer(env).start()
    answered: list[str] = []
    stop = threading.Event()

    def client(value: int) -> None:
        with httpx.Client(base_url=server.url, timeout=10) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        "/v1/predict",
                        data={"modality": "photo"},
                        files={"file": ("a.png", image_bytes(value))},
                    )
                except httpx.HTTPError:
                    continue  # the server died mid-request: no answer, so nothing owed
                if response.status_code == 200:
                    answered.append(response.json()["request_id"])

    threads = [threading.Thread(target=client, args=(i * 30,)) for i in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    while len(answered) < 30 and time.monotonic() < deadline:  # kill mid-load, however busy the machine
        time.sleep(0.1)
    server.stop(kill=True)  # SIGKILL: no shutdown hooks, no flush
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert len(answered) > 20, "the load did not get going"
    restarted = LiveServer(env).start()  # opens the same database (WAL recovery)
    try:
        assert restarted.process is not None and httpx.get(restarted.url + "/readyz").status_code == 200
        store = SQLiteAuditStore(tmp_path / "audit.sqlite")
        missing = [request_id for request_id in answered if store.get(request_id) is None]
        store.close()
    finally:
        restarted.stop()
    assert not missing, f"{len(missing)} of {len(answered)} answered requests have no audit record"


def test_graceful_shutdown_finishes_in_flight_requests(tmp_path) -> None:
    """SIGTERM under load: requests already accepted are answered and audited, and the process exits 0."""
    env = server_env(tmp_path, VERITY_RATE_LIMIT_PER_S="0")  # full load from one caller: not 429s
    server = LiveServer(env).start()
    answered: list[str] = []
    failures: list[int] = []
    stop = threading.Event()

    def client() -> None:
        with httpx.Client(base_url=server.url, timeout=30) as http:
            while not stop.is_set():
                try:
                    response = http.post(
                        "/v1/predict", data={"modality": "photo"}, files={"file": ("a.png", image_bytes(200))}
                    )
                except httpx.HTTPError:
                    return  # refused after shutdown began: not accepted, nothing owed
                if response.status_code == 200:
                    answered.append(response.json()["request_id"])
                else:
                    failures.append(response.status_code)

    threads = [threading.Thread(target=client) for _ in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(1.5)
    server.process.terminate()
    # uvicorn re-raises the signal after its graceful shutdown, so the exit status is -SIGTERM.
    assert server.process.wait(timeout=40) in (0, -15)
    assert "Application shutdown complete" in server.log_path.read_text()
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert answered and not [code for code in failures if code != 503]
    store = SQLiteAuditStore(tmp_path / "audit.sqlite")
    assert all(store.get(request_id) is not None for request_id in answered)
    store.close()
