"""Least connections between the worker processes of `verity serve --workers N`.

Why: the workers share one listening socket, and whichever worker's event loop wakes first accepts
every connection waiting (uvloop, like libuv, drains the queue at each wake). A keep-alive connection
then stays with that worker for as long as the client keeps it. Under a burst of 32 connections on 2
workers the split ran from 8/24 to 16/16 over runs, and the worker holding 24 set the tail: p99 1.71 to
1.82 times the Little's-law mean at 8/24 and 14/18, 1.39 at 15/17 (benchmarks/server_tail.py).

How: every worker keeps the number of connections it holds in a table that all of them share (a small
file mapped into memory, changed under a file lock). A worker that accepts a connection while another
holds fewer hands the socket to that worker over a Unix socket (SCM_RIGHTS) before reading a byte from
it, and the other serves it as if it had accepted it: nginx's and HAProxy's least-connections rule,
whichever worker the kernel woke. Each worker also writes a heartbeat from its event loop four times a
second, and a worker whose beat is older than a second (stuck on one request, stopped, dying) is given
nothing: without that, least connections would send half the new connections to the one worker that
cannot answer them. A hand-off that fails (the other worker is gone or not reading) keeps the connection
where it is, so balancing loses no request.

`verity serve` makes the folder (VERITY_CONNECTION_BALANCE_DIR) when it starts more than one worker;
each worker's lifespan starts its `Balancer`, and the HTTP protocol (api/http_protocol.py) asks it where
each new connection goes.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import mmap
import os
import socket
import time
from array import array
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger("verity.api")

TABLE_FILE = "connections"
SLOTS = 64  # as many as `verity serve --workers` allows
# Each slot: the worker's pid (0: free), the connections it holds, its last heartbeat (ms), and the
# connections it has handed to others and been handed (for /metrics: any worker reports every worker).
FIELDS = 5
HELD, BEAT, HANDED_OUT, HANDED_IN = 1, 2, 3, 4
BEAT_S = 0.25
STALE_MS = 1000  # four beats missed: the worker's loop is not running, so it gets no connections
HAND_OFF = b"c"  # the one byte each hand-off message carries beside its descriptor


class ConnectionTable:
    """Every worker's pid and open connections, in a file mapped by all of them. Each change is made under
    an exclusive flock, so a count moved by two workers at once is never lost."""

    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        size = SLOTS * FIELDS * 8
        if os.fstat(self.fd).st_size < size:
            os.ftruncate(self.fd, size)  # zero-filled; a second worker doing it too changes nothing
        self.map = mmap.mmap(self.fd, size)
        self.cells = memoryview(self.map).cast("q")

    @contextlib.contextmanager
    def locked(self) -> Iterator[ConnectionTable]:
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield self
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def pid(self, slot: int) -> int:
        return int(self.cells[slot * FIELDS])

    def field(self, slot: int, field: int) -> int:
        return int(self.cells[slot * FIELDS + field])

    def held(self, slot: int) -> int:
        return self.field(slot, HELD)

    def add(self, slot: int, change: int, field: int = HELD) -> None:
        self.cells[slot * FIELDS + field] = max(0, self.field(slot, field) + change)

    def beat(self, slot: int) -> None:
        """Only the slot's own worker writes it: one aligned 8-byte store, which needs no lock."""
        self.cells[slot * FIELDS + BEAT] = now_ms()

    def responsive(self, slot: int) -> bool:
        return now_ms() - self.field(slot, BEAT) <= STALE_MS

    def workers(self) -> list[tuple[int, int, int, int]]:
        """(pid, connections held, handed out, handed in) of every worker in the table."""
        with self.locked():
            return [
                (self.pid(s), self.held(s), self.field(s, HANDED_OUT), self.field(s, HANDED_IN))
                for s in range(SLOTS)
                if self.pid(s) != 0
            ]

    def claim(self, pid: int) -> int | None:
        """A free slot, or one whose worker has died (a restarted worker takes its place), for `pid`."""
        with self.locked():
            for slot in range(SLOTS):
                if self.pid(slot) == 0 or not alive(self.pid(slot)):
                    self.cells[slot * FIELDS : (slot + 1) * FIELDS] = array("q", [pid] + [0] * (FIELDS - 1))
                    self.beat(slot)
                    return slot
        return None

    def release(self, slot: int) -> None:
        with self.locked():
            self.cells[slot * FIELDS : (slot + 1) * FIELDS] = array("q", [0] * FIELDS)

    def fewest(self, besides: int) -> int | None:
        """The responsive worker other than `besides` that holds the fewest connections (call under the
        lock)."""
        others = [s for s in range(SLOTS) if s != besides and self.pid(s) != 0 and self.responsive(s)]
        return min(others, key=self.held, default=None)

    def close(self) -> None:
        self.cells.release()
        self.map.close()
        os.close(self.fd)


def now_ms() -> int:
    """CLOCK_MONOTONIC, which every process on the box reads alike."""
    return time.monotonic_ns() // 1_000_000


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def receiver_path(directory: Path, pid: int) -> Path:
    return directory / f"{pid}.sock"


class Balancer:
    """One worker's side: its slot in the table, the Unix socket it receives connections on, and the
    links it hands connections over to its siblings."""

    def __init__(
        self, directory: Path, protocol_factory: Callable[[], asyncio.Protocol], ssl: Any = None
    ) -> None:
        self.directory, self.pid = directory, os.getpid()
        self.protocol_factory, self.ssl = protocol_factory, ssl
        self.loop = asyncio.get_running_loop()
        self.table = ConnectionTable(directory / TABLE_FILE)
        self.links: dict[int, socket.socket] = {}  # sibling pid -> a connected SEQPACKET socket
        self.readers: set[socket.socket] = set()
        self.arriving: set[asyncio.Task[Any]] = set()
        # SEQPACKET rather than datagrams: a datagram socket queues at most net.unix.max_dgram_qlen (10)
        # messages for a busy receiver; a connected one is bounded by its buffer.
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(receiver_path(directory, self.pid)))
        self.listener.listen(SLOTS)
        self.listener.setblocking(False)
        self.loop.add_reader(self.listener.fileno(), self._accept_sibling)
        self.slot = self.table.claim(self.pid)  # only now can a sibling find this worker
        self.heartbeat = self.loop.create_task(self._beat())

    async def _beat(self) -> None:
        while self.slot is not None:
            self.table.beat(self.slot)
            await asyncio.sleep(BEAT_S)

    # -- the accepting side ---------------------------------------------------------------------------
    def place(self, transport: asyncio.BaseTransport) -> bool:
        """For a connection this worker just accepted: True when it went to a worker holding fewer
        connections (the caller then closes its copy without reading), False when this worker keeps it."""
        if self.slot is None:
            return False
        with self.table.locked():
            target = self.table.fewest(besides=self.slot)
            if target is not None and self.table.held(target) < self.table.held(self.slot):
                self.table.add(target, +1)  # counted now, so the next connection sees it
                if self._send(self.table.pid(target), transport):
                    self.table.add(self.slot, +1, HANDED_OUT)
                    self.table.add(target, +1, HANDED_IN)
                    return True
                self.table.add(target, -1)
                if not alive(self.table.pid(target)):
                    self.table.cells[target * FIELDS] = 0  # a worker killed without its lifespan's end
            self.table.add(self.slot, +1)
        return False

    def closed(self) -> None:
        """A connection this worker held (accepted and kept, or handed to it) has closed."""
        if self.slot is not None:
            with self.table.locked():
                self.table.add(self.slot, -1)

    def _send(self, pid: int, transport: asyncio.BaseTransport) -> bool:
        connection = transport.get_extra_info("socket")
        link = self.links.get(pid) or self._link(pid)
        if connection is None or link is None:
            return False
        try:
            socket.send_fds(link, [HAND_OFF], [connection.fileno()])
        except BlockingIOError:
            return False  # the sibling is not reading: keep the connection rather than wait
        except OSError:
            self.links.pop(pid, None)
            link.close()
            return False
        return True

    def _link(self, pid: int) -> socket.socket | None:
        link = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        link.setblocking(False)
        try:
            link.connect(str(receiver_path(self.directory, pid)))
        except OSError:
            link.close()
            return None
        self.links[pid] = link
        return link

    # -- the receiving side ---------------------------------------------------------------------------
    def _accept_sibling(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            reader, _ = self.listener.accept()
            reader.setblocking(False)
            self.readers.add(reader)
            self.loop.add_reader(reader.fileno(), self._receive, reader)

    def _receive(self, reader: socket.socket) -> None:
        while True:
            try:
                message, fds, _, _ = socket.recv_fds(reader, len(HAND_OFF), 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                message, fds = b"", []
            if not message and not fds:  # the sibling has gone
                self._drop_reader(reader)
                return
            for fd in fds:
                self._serve(fd)

    def _serve(self, fd: int) -> None:
        try:
            connection = socket.socket(fileno=fd)
            connection.setblocking(False)
        except OSError:
            os.close(fd)
            self.closed()  # the sender counted it for this worker
            return
        task = self.loop.create_task(self._connect(connection))
        self.arriving.add(task)
        task.add_done_callback(self.arriving.discard)

    async def _connect(self, connection: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.protocol_factory, connection, ssl=self.ssl)
        except OSError:
            log.warning("a connection handed over by another worker could not be served", exc_info=True)
            connection.close()
            self.closed()

    def _drop_reader(self, reader: socket.socket) -> None:
        self.loop.remove_reader(reader.fileno())
        self.readers.discard(reader)
        reader.close()

    def stop(self) -> None:
        """Leaves the table first, so no sibling hands this worker anything more."""
        self.heartbeat.cancel()
        if self.slot is not None:
            self.table.release(self.slot)
            self.slot = None
        self.loop.remove_reader(self.listener.fileno())
        self.listener.close()
        with contextlib.suppress(OSError):
            receiver_path(self.directory, self.pid).unlink()
        for reader in list(self.readers):
            self._drop_reader(reader)
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.table.close()


_current: Balancer | None = None


def current() -> Balancer | None:
    """This worker's balancer while its lifespan runs; None in a single process and in tests in process."""
    return _current


def start(directory: Path) -> Balancer | None:
    """Starts this worker's balancer (from its lifespan, in the event loop uvicorn serves from). None, with
    a warning, where the app does not run under uvicorn's Server (the hand-off needs its protocol) or the
    folder cannot be used: the worker then serves what it accepts, as without balancing."""
    global _current
    server = _uvicorn_server()
    if server is None:
        log.warning("not under uvicorn's Server: connections are not balanced between workers")
        return None
    try:
        _current = Balancer(directory, _protocol_factory(server), getattr(server.config, "ssl", None))
    except OSError as error:
        log.warning(f"connections are not balanced between workers: {directory}: {error}")
        return None
    return _current


def stop() -> None:
    global _current
    if _current is not None:
        _current.stop()
        _current = None


def _uvicorn_server() -> Any:
    """The uvicorn Server whose `serve` is this event loop's main task (uvicorn's `Server.run` runs it with
    asyncio.run). uvicorn gives an app no handle on its server; the hand-off needs the protocol factory
    that the server's own listener uses, so that a handed connection is counted, limited and shut down
    as an accepted one is."""
    try:
        from uvicorn import Server
    except ImportError:  # pragma: no cover - the server extra is always installed with the api
        return None
    for task in asyncio.all_tasks():
        coroutine = task.get_coro()
        frame = getattr(coroutine, "cr_frame", None)
        if frame is not None and getattr(coroutine, "cr_code", None) is Server.serve.__code__:
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Server):
                return candidate
    return None


def _protocol_factory(server: Any) -> Callable[[], asyncio.Protocol]:
    """uvicorn's own protocol for each handed connection, marked so that it is not handed on again."""

    def handed_in() -> asyncio.Protocol:
        protocol = server.config.http_protocol_class(
            config=server.config, server_state=server.server_state, app_state=server.lifespan.state
        )
        protocol.handed_in = True
        return protocol

    return handed_in
