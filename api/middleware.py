"""Per-request context as plain ASGI middleware: request_id, body limit, metrics and the access log;
and the exposure guards around it: the Host check, the cross-site request check and the security
headers on every answer.

The body limit is enforced while the body streams in: a declared Content-Length over the limit is
refused before a byte is read, and a chunked body is counted and cut off as soon as it passes the
limit, so an oversized upload never sits in memory or on disk whole.

The body also has a deadline (uvicorn has none): body_timeout_s from the request head, plus a second
for every body_min_rate bytes received. A client trickling its body (1 byte every 3 s held a
connection 36 s and more) gets a 408 and the connection is closed; a slow but honest upload keeps
earning time. The request head's own deadline is the protocol's (api/http_protocol.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from verity.api.errors import error_detail, error_response, truncated
from verity.api.logs import request_id_var
from verity.api.metrics import Metrics

log = logging.getLogger("verity.api.access")


class BodyRefused(Exception):
    """Raised inside the app when the streamed body is too large or too slow; the middleware answers."""

    def __init__(self, status: int, code: str, message: str, limit_bytes: int | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.limit_bytes = limit_bytes  # a 413's route limit


class RequestContextMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
        body_limit: Callable[[str, str], int],
        body_timeout_s: float = 10.0,
        body_min_rate: int = 16 * 1024,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit
        self.body_timeout_s = body_timeout_s
        self.body_min_rate = body_min_rate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = uuid.uuid4().hex
        started = time.perf_counter()
        scope["state"] = {**scope.get("state", {}), "request_id": request_id, "started": started}
        token = request_id_var.set(request_id)
        path, method = scope["path"], scope["method"]
        limit = self.body_limit(method, path)
        state: dict[str, Any] = {"status": 500, "seen": 0, "body_done": False, "refused": None}
        self.metrics.in_flight.inc()
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                state["status"] = 413
                await self._send_refusal(send, request_id, _too_large(limit), path)
                return
            await self._run(scope, receive, send, request_id, limit, state)
        finally:
            self.metrics.in_flight.dec()
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            route_label = getattr(route, "path", None) or "<unmatched>"
            self.metrics.requests.labels(route_label, method, str(state["status"])).inc()
            self.metrics.latency.labels(route_label).observe(elapsed)
            log.info(
                "request",
                extra={
                    "method": method,
                    "path": path,
                    "status": state["status"],
                    "latency_ms": round(elapsed * 1000, 2),
                },
            )
            request_id_var.reset(token)

    async def _receive_in_time(self, receive: Receive, state: dict[str, Any]) -> Message:
        """The next message, within the body's deadline (none once the body is whole: what follows is
        only the wait for a disconnect)."""
        if state["body_done"]:
            return await receive()
        deadline = self.body_timeout_s + state["seen"] / self.body_min_rate
        remaining = state["started"] + deadline - time.perf_counter()
        try:
            async with asyncio.timeout(max(remaining, 0.0)):
                return await receive()
        except TimeoutError:
            self.metrics.timed_out.inc()
            message = (
                f"The request body did not arrive in time: {state['seen']:,} bytes in {deadline:.1f} s. "
                f"Send it within {self.body_timeout_s:g} s, plus a second per {self.body_min_rate:,} bytes."
            )
            raise BodyRefused(408, "request_timeout", message) from None

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, limit: int, state: dict
    ) -> None:
        state["started"] = scope["state"]["started"]

        async def checked_receive() -> Message:
            try:
                message = await self._receive_in_time(receive, state)
                if message["type"] == "http.request":
                    state["seen"] += len(message.get("body", b""))
                    state["body_done"] = not message.get("more_body", False)
                    if state["seen"] > limit:
                        raise _too_large(limit)
                return message
            except BodyRefused as refusal:
                state["refused"] = refusal
                raise

        async def tagging_send(message: Message) -> None:
            if state["refused"]:
                return  # whatever the app made of the refused body, the client gets our 413 or 408
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, checked_receive, tagging_send)
        except Exception:
            if not state["refused"]:
                raise
        if state["refused"]:
            state["status"] = state["refused"].status
            await self._send_refusal(send, request_id, state["refused"], scope["path"])

    @staticmethod
    async def _send_refusal(send: Send, request_id: str, refusal: BodyRefused, path: str) -> None:
        """The error answer in the route family's shape; the connection is closed after it, since the
        rest of the body was never read."""
        body: dict[str, Any]
        if path.startswith("/v2"):
            body = {"error": refusal.message}
        else:
            detail = error_detail(
                refusal.code, refusal.message, request_id, refusal.status, limit_bytes=refusal.limit_bytes
            )
            body = {"error": detail}
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": refusal.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", request_id.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _too_large(limit: int) -> BodyRefused:
    message = f"The request body is larger than this route's limit of {limit:,} bytes."
    return BodyRefused(413, "request_too_large", message, limit_bytes=limit)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _header(scope: Scope, name: bytes) -> str | None:
    """The first value of a request header, or None when absent."""
    return next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == name), None)


def host_name(header: str) -> str:
    """The name in a Host header, without its port, lower case, without a trailing dot ('[::1]' kept)."""
    host = header.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1] if "]" in host else host
    return host.split(":", 1)[0].rstrip(".")


def host_allowed(host: str, allowed: list[str]) -> bool:
    """'*' allows any name, '*.example.org' the names under example.org, anything else itself."""
    for pattern in allowed:
        if pattern == "*" or host == pattern.lower():
            return True
        if pattern.startswith("*.") and host.endswith(pattern[1:].lower()):
            return True
    return False


class HostCheckMiddleware:
    """Answers only requests whose Host header names this server: a web page that rebinds its own DNS
    name to 127.0.0.1 sends its own name, and gets a 400 JSON instead of the API (Starlette's
    TrustedHostMiddleware answers plain text and drops the port of '[::1]:8000' wrongly)."""

    def __init__(self, app: ASGIApp, allowed_hosts: list[str]) -> None:
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or "*" in self.allowed_hosts:
            await self.app(scope, receive, send)
            return
        header = _header(scope, b"host") or ""
        if host_allowed(host_name(header), self.allowed_hosts):
            await self.app(scope, receive, send)
            return
        message = (
            f"The Host header {truncated(header)!r} does not name this server; an operator can allow a name "
            "with VERITY_ALLOWED_HOSTS."
        )
        response = error_response(None, 400, "invalid_host", message, path=scope["path"])
        await response(scope, receive, send)


# Methods that change state: a cross-site page may not send them (api.middleware.CrossSiteMiddleware).
STATE_CHANGING_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def origin_authority(origin: str) -> str | None:
    """The host[:port] of an Origin header as browsers serialise it (scheme://host[:port], default port
    left out), lower case; None for "null" and anything that is not such an origin."""
    scheme, separator, authority = origin.strip().lower().partition("://")
    if not separator or scheme not in ("http", "https") or not authority or "/" in authority:
        return None
    return authority


def cross_site_refusal(scope: Scope, allowed_origins: list[str]) -> str | None:
    """Why a state-changing request must be refused as cross-site, or None to let it through.

    A browser marks every cross-origin POST with Origin (and Sec-Fetch-Site), and a page cannot forge
    either; clients that are not browsers (curl, scanner consoles) send no Origin and pass. The same
    origin is the request's own Host: the console at / sends Origin http://127.0.0.1:8000 with Host
    127.0.0.1:8000, also behind a TLS proxy that keeps the Host. Another port of the same host is
    another origin ("same-site" to a browser), so it is refused like any other site."""
    origin = _header(scope, b"origin")
    if origin is not None and origin.strip().lower().rstrip("/") in allowed_origins:
        return None
    fetch_site = (_header(scope, b"sec-fetch-site") or "").strip().lower()
    if origin is None:  # "same-site" too: a browser that says so without an Origin is no console of ours
        marked = fetch_site in ("cross-site", "same-site")
        return "the browser marked it as sent by another origin (Sec-Fetch-Site)" if marked else None
    if fetch_site == "cross-site":
        return "the browser marked it as sent by another site (Sec-Fetch-Site: cross-site)"
    host = (_header(scope, b"host") or "").strip().lower()
    authority = origin_authority(origin)
    if authority is None:
        return "its Origin is opaque (null: a sandboxed frame, a file or a data: page)"
    if authority != host:
        return f"its Origin {truncated(origin)!r} is not this server's"
    return None


class CrossSiteMiddleware:
    """Refuses state-changing requests (POST, PUT, PATCH, DELETE) that a web page on another origin
    sent: on an unkeyed loopback server any page the officer opens could otherwise post verdicts with
    any station and case, send feedback or change references in the officer's name (a form POST or a
    text/plain fetch needs no CORS preflight). 403 with the route family's error body; reads (GET, HEAD)
    pass, since their answers never reach another origin without CORS, which this server never grants.
    `allowed_origins` (VERITY_ALLOWED_ORIGINS) lists pages on other origins an operator trusts."""

    def __init__(self, app: ASGIApp, allowed_origins: list[str]) -> None:
        self.app = app
        self.allowed_origins = [origin.strip().lower().rstrip("/") for origin in allowed_origins]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in STATE_CHANGING_METHODS:
            await self.app(scope, receive, send)
            return
        reason = cross_site_refusal(scope, self.allowed_origins)
        if reason is None:
            await self.app(scope, receive, send)
            return
        log.warning("cross-site request refused", extra={"path": scope["path"], "reason": reason})
        message = (
            f"Refused: {reason}. State-changing requests are accepted from this server's own pages and "
            "from clients that send no Origin; an operator can trust another page with "
            "VERITY_ALLOWED_ORIGINS."
        )
        response = error_response(None, 403, "cross_site_request", message, path=scope["path"])
        await response(scope, receive, send)


SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
)
# API answers are data, never a page: nothing may load from them, and no site may frame them.
API_CSP = b"default-src 'none'; frame-ancestors 'none'"
# The docs pages run their own inline start-up script and the bundled assets, from this server only.
DOCS_CSP = (
    b"default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    b"img-src 'self' data:; worker-src 'self' blob:; frame-ancestors 'none'"
)
# The inspection console (api/console): its own scripts and styles only, never inline; images it shows
# from data: and blob: URLs (the heatmap, the camera's frame); calls only to this server.
CONSOLE_CSP = (
    b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    b"connect-src 'self'; media-src 'self' blob:; font-src 'self'; manifest-src 'self'; base-uri 'none'; "
    b"form-action 'none'; frame-ancestors 'none'"
)
# The phone camera (getUserMedia) for the console's own origin only.
CONSOLE_PERMISSIONS = b"camera=(self)"


class SecurityHeadersMiddleware:
    """Adds nosniff, DENY framing, no-referrer and a Content-Security-Policy to every answer, and
    Cache-Control: no-store to all but static files (verdicts must not sit in a shared cache): the docs'
    assets keep their own caching, the console's page and files are `no-cache` (kept, but revalidated,
    so a new version is picked up at once). Outermost, so the 413 and other answers made by the
    middleware below get them too."""

    def __init__(
        self,
        app: ASGIApp,
        docs_pages: tuple[str, ...],
        assets_prefix: str,
        console_pages: tuple[str, ...] = (),
        console_prefix: str | None = None,
    ) -> None:
        self.app = app
        self.docs_pages = docs_pages
        self.assets_prefix = assets_prefix
        self.console_pages = console_pages
        self.console_prefix = console_prefix

    def _is_console(self, path: str) -> bool:
        if path in self.console_pages:
            return True
        return self.console_prefix is not None and path.startswith(self.console_prefix + "/")

    def _headers_for(self, path: str) -> list[tuple[bytes, bytes]]:
        added = list(SECURITY_HEADERS)
        if self._is_console(path):
            added.append((b"content-security-policy", CONSOLE_CSP))
            added.append((b"permissions-policy", CONSOLE_PERMISSIONS))
            added.append((b"cache-control", b"no-cache"))
            return added
        added.append((b"content-security-policy", DOCS_CSP if path in self.docs_pages else API_CSP))
        if not path.startswith(self.assets_prefix + "/"):
            added.append((b"cache-control", b"no-store"))
        return added

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        added = self._headers_for(scope["path"])

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [(name, value) for name, value in added if name not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, with_headers)
