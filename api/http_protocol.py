"""`verity serve`'s HTTP protocol: uvicorn's own, with a deadline for the request head.

uvicorn (0.30 to 0.54) closes idle keep-alive connections but has no header-read timeout: a connection
that sends nothing, or a request head trickled a byte at a time, was held 21 s and more (as long as
the client liked). This subclass arms a timer when a connection opens and after each answer; when it
fires and no request head has arrived meanwhile, the client gets a 408 (if it had sent anything) and
the connection is closed. A request whose head arrived is the body deadline's business (api/middleware.py).

`verity serve` passes it to uvicorn as `http="verity.api.http_protocol:HeadDeadlineProtocol"`, a name
that worker processes import for themselves; each reads VERITY_HEADER_TIMEOUT_S from its settings.
"""

from __future__ import annotations

import asyncio
import functools
import json
from typing import Any

from verity.api import connection_balance
from verity.api.settings import load_settings

try:  # the parser uvicorn's "auto" picks: httptools where it is installed (uvicorn[standard]), else h11
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as _UvicornProtocol
except ImportError:  # pragma: no cover - platforms without httptools wheels
    from uvicorn.protocols.http.h11_impl import H11Protocol as _UvicornProtocol  # type: ignore[assignment]


@functools.cache
def header_timeout_s() -> float:
    """Read once per process, from the same settings the app of this worker reads."""
    return load_settings().header_timeout_s


def timeout_response(timeout_s: float, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A raw HTTP/1.1 408 with the /v1 error body (the path is not known before the head is whole)."""
    message = f"The request head did not arrive within {timeout_s:g} s."
    body = json.dumps({"error": {"code": "request_timeout", "message": message, "request_id": ""}}).encode()
    lines = [b"HTTP/1.1 408 Request Timeout"]
    lines += [name + b": " + value for name, value in default_headers]
    lines += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


class HeadDeadlineProtocol(_UvicornProtocol):
    """Closes a connection whose next request head has not arrived within the header timeout."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.head_timer: asyncio.TimerHandle | None = None
        self.head_armed_cycle: object = None  # the request cycle when the timer was armed
        self.head_bytes_seen = False
        self.handed_in = False  # handed over by another worker (api/connection_balance.py)
        self.handed_off = False  # handed over to another worker: this copy was closed unread

    def arm_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_armed_cycle, self.head_bytes_seen = self.cycle, False
        self.head_timer = self.loop.call_later(header_timeout_s(), self.head_deadline_passed)

    def head_deadline_passed(self) -> None:
        self.head_timer = None
        idle = self.cycle is None or self.cycle.response_complete  # no request is being answered
        if self.transport.is_closing() or self.cycle is not self.head_armed_cycle or not idle:
            return  # a new head arrived (its body has its own deadline), or the connection is gone
        if self.head_bytes_seen:
            self.transport.write(timeout_response(header_timeout_s(), self.server_state.default_headers))
        self.transport.close()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        balancer = connection_balance.current()
        if balancer is not None and not self.handed_in and balancer.place(transport):
            self.handed_off = True
            transport.close()  # the other worker holds the socket now; nothing was read from it here
            return
        super().connection_made(transport)
        self.arm_head_timer()

    def data_received(self, data: bytes) -> None:
        self.head_bytes_seen = True
        super().data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self.arm_head_timer()  # the next request's head gets the full timeout

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed_off:
            return  # uvicorn never saw this copy of the connection
        balancer = connection_balance.current()
        if balancer is not None:
            balancer.closed()
        if self.head_timer is not None:
            self.head_timer.cancel()
            self.head_timer = None
        super().connection_lost(exc)
