"""Per-request context as plain ASGI middleware: request_id, body limit, metrics and the access log.

The body limit is enforced while the body streams in: a declared Content-Length over the limit is
refused before a byte is read, and a chunked body is counted and cut off as soon as it passes the
limit, so an oversized upload never sits in memory or on disk whole.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from verity.api.logs import request_id_var
from verity.api.metrics import Metrics

log = logging.getLogger("verity.api.access")


class BodyTooLarge(Exception):
    """Raised inside the app when the streamed body passes the limit; the middleware answers 413."""


class RequestContextMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics, body_limit: Callable[[str, str], int]) -> None:
        self.app = app
        self.metrics = metrics
        self.body_limit = body_limit

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
        state = {"status": 500, "seen": 0, "too_large": False, "app_started": False}
        self.metrics.in_flight.inc()
        try:
            declared = _content_length(scope)
            if declared is not None and declared > limit:
                await self._send_413(send, request_id, limit, path)
                state["status"] = 413
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

    async def _run(
        self, scope: Scope, receive: Receive, send: Send, request_id: str, limit: int, state: dict
    ) -> None:
        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state["seen"] += len(message.get("body", b""))
                if state["seen"] > limit:
                    state["too_large"] = True
                    raise BodyTooLarge()
            return message

        async def tagging_send(message: Message) -> None:
            if state["too_large"]:
                return  # whatever the app made of the cut-off body, the client gets our 413
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
                state["app_started"] = True
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            await self.app(scope, counting_receive, tagging_send)
        except BodyTooLarge:
            pass
        except Exception:
            if not state["too_large"]:
                raise
        if state["too_large"]:
            state["status"] = 413
            await self._send_413(send, request_id, limit, scope["path"])

    @staticmethod
    async def _send_413(send: Send, request_id: str, limit: int, path: str) -> None:
        message = f"The request body is larger than this route's limit of {limit:,} bytes."
        body: dict[str, Any]
        if path.startswith("/v2"):
            body = {"error": message}
        else:
            body = {"error": {"code": "request_too_large", "message": message, "request_id": request_id}}
        payload = json.dumps(body).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-request-id", request_id.encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
