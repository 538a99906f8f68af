"""Least connections between `verity serve --workers 2` processes (api/connection_balance.py).

The live test makes the kernel's choice as uneven as it can be: one worker is stopped (SIGSTOP) while 32
connections open and send their request, so the other accepts every one of them. Without the hand-off
(VERITY_BALANCE_CONNECTIONS=false, the test's second case) that worker keeps all 32 (a split of 0/32,
where a burst on two running workers gave 8/24 to 16/16); with it, half go to the stopped worker's queue
and are answered once it runs again.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from api_fixtures import LiveServer, server_env
from test_shared_state import both_ready

from benchmarks.server_tail import _children, connections_by_worker
from verity.api import connection_balance
from verity.api.connection_balance import FIELDS, SLOTS, STALE_MS, ConnectionTable

CONNECTIONS = 32


def test_the_table_gives_a_dead_workers_slot_to_its_successor(tmp_path: Path) -> None:
    table = ConnectionTable(tmp_path / "connections")
    beside = ConnectionTable(tmp_path / "connections")  # a second worker maps the same file
    first, second = table.claim(os.getpid()), beside.claim(os.getppid())
    assert (first, second) == (0, 1)
    with table.locked():
        table.add(first, +3)
        table.add(second, +1)
    with beside.locked():
        assert beside.fewest(besides=first) == second and beside.held(first) == 3
        beside.add(second, -5)
        assert beside.held(second) == 0  # a count never goes below zero
    dead = _a_finished_pid()
    table.cells[second * FIELDS] = dead  # as if the second worker had been killed holding its slot
    assert table.claim(os.getpid()) == second  # its restarted successor takes the slot, with no count
    assert table.held(second) == 0
    with table.locked():
        assert table.fewest(besides=second) == first
    table.cells[first * FIELDS + 2] -= STALE_MS + 1  # its heartbeat stopped: stuck, or stopped
    with table.locked():
        assert table.fewest(besides=second) is None  # so it is given nothing
    table.beat(first)
    table.release(first)
    with table.locked():
        assert table.fewest(besides=second) is None  # no other live worker: nothing to hand over to
    assert SLOTS >= 64  # every worker count `verity serve --workers` accepts


def test_an_app_not_under_uvicorns_server_serves_unbalanced(tmp_path: Path, caplog) -> None:  # noqa: ANN001
    """In process (tests, Ray Serve) there is no uvicorn Server to take connections for: no balancer, a
    warning, and the protocol keeps every connection it is given."""

    async def started() -> object:
        return connection_balance.start(tmp_path)

    assert asyncio.run(started()) is None and connection_balance.current() is None
    assert "not balanced" in caplog.text
    assert not any(tmp_path.iterdir())  # nothing claimed or bound


def _a_finished_pid() -> int:
    import subprocess

    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.slow
@pytest.mark.parametrize("balanced", [True, False], ids=["balanced", "VERITY_BALANCE_CONNECTIONS=false"])
def test_connections_accepted_by_one_worker_are_shared_with_the_other(tmp_path: Path, balanced: bool) -> None:
    env = server_env(tmp_path, VERITY_WARMUP="false", VERITY_BALANCE_CONNECTIONS=str(balanced).lower())
    live = both_ready(LiveServer(env, ["--workers", "2"]).start(120))
    clients: list[socket.socket] = []
    try:
        assert live.process is not None
        workers = _workers(live.process.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGSTOP)  # it cannot accept: the kernel gives the other every connection
        try:
            clients = [
                socket.create_connection(("127.0.0.1", live.port), timeout=30) for _ in range(CONNECTIONS)
            ]
            for client in clients:
                client.sendall(_health_request())
            time.sleep(0.5)  # the running worker accepts them all (and answers its own half)
        finally:
            os.kill(workers[1], signal.SIGCONT)
        for client in clients:  # every request is answered, by whichever worker holds its connection
            assert _answer(client).startswith(b"HTTP/1.1 200")
        for client in clients:  # and the connection lives on for the next request
            client.sendall(_health_request())
            assert _answer(client).startswith(b"HTTP/1.1 200")
        split = connections_by_worker(live.process.pid, live.port)
        figures = _metric_lines(httpx.get(live.url + "/metrics", timeout=10).text)
        if not balanced:  # each worker keeps what the kernel gave it, and /metrics has no table to show
            assert split == [CONNECTIONS] and figures == {}, (split, figures)
            return
        assert len(split) == 2 and split[1] - split[0] <= 2, split
        # /metrics, from whichever worker answers, shows both workers' connections and the hand-offs.
        held = [figures[f'verity_worker_connections{{worker="{pid}"}}'] for pid in workers]
        assert sum(held) >= CONNECTIONS - 1 and max(held) - min(held) <= 3, figures  # the scrape's own too
        handed_out = figures[f'verity_connections_handed_total{{direction="out",worker="{workers[0]}"}}']
        handed_in = figures[f'verity_connections_handed_total{{direction="in",worker="{workers[1]}"}}']
        assert handed_out >= CONNECTIONS // 2 - 2 and handed_in == handed_out, figures
    finally:
        for client in clients:
            client.close()
        live.stop()


@pytest.mark.slow
def test_a_stuck_worker_is_given_no_connections(tmp_path: Path) -> None:
    """A worker whose loop has not run for longer than its heartbeat allows (here stopped; in life stuck
    on a request) gets none: every connection is answered by the other while it stays stuck."""
    live = both_ready(LiveServer(server_env(tmp_path, VERITY_WARMUP="false"), ["--workers", "2"]).start(120))
    try:
        assert live.process is not None
        workers = _workers(live.process.pid)
        os.kill(workers[1], signal.SIGSTOP)
        try:
            time.sleep(STALE_MS / 1000 + 0.5)
            clients = [
                socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(CONNECTIONS)
            ]
            for client in clients:
                client.sendall(_health_request())
            for client in clients:
                assert _answer(client).startswith(b"HTTP/1.1 200")
            assert connections_by_worker(live.process.pid, live.port) == [CONNECTIONS]
        finally:
            os.kill(workers[1], signal.SIGCONT)
        for client in clients:
            client.close()
    finally:
        live.stop()


def _workers(server_pid: int) -> list[int]:
    """The server's worker processes (its other child is multiprocessing's resource tracker)."""
    return [
        pid for pid in _children(server_pid) if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def _metric_lines(text: str) -> dict[str, float]:
    return {
        name: float(value)
        for name, _, value in (line.rpartition(" ") for line in text.splitlines())
        if name.startswith(("verity_worker_connections", "verity_connections_handed_total"))
    }


def _health_request() -> bytes:
    return b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def _answer(client: socket.socket) -> bytes:
    """One whole answer to /healthz (its body is small: the head says how long)."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = client.recv(65536)
        assert chunk, "the connection closed before its answer"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
    )
    while len(body) < length:
        body += client.recv(65536)
    return head
