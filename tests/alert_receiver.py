"""A webhook receiver on loopback for the seizure alert tests: records what arrives, answers a status
the test sets, and can be stopped and started again on the same port (a right holder that is down)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from api_fixtures import free_port

from verity.api.alerts import ID_HEADER, verify


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def alert_id(self) -> str:
        return self.headers[ID_HEADER]

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class AlertReceiver:
    """`start()` listens on 127.0.0.1:`port`; `stop()` closes the socket (connections are then refused)."""

    port: int = field(default_factory=free_port)
    status: int = 200  # what every POST is answered with
    received: list[Received] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/verity"

    def start(self) -> AlertReceiver:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                with receiver._lock:
                    receiver.received.append(Received(dict(self.headers.items()), body))
                self.send_response(receiver.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def ids(self) -> list[str]:
        with self._lock:
            return [item.alert_id for item in self.received]

    def all_verify(self, secret: str, now: float) -> bool:
        with self._lock:
            return all(verify(secret, item.body, item.headers, now) for item in self.received)
