"""The attacks of the hardening suite, one function per row of issue 13's table, and the measurements.

Each attack returns `Row`s: what was sent, the answer's status, how long it took, how much the server's
resident memory grew meanwhile (when its process id is known), and whether the row kept its bound.
`benchmarks/hostile_server.py` prints them; `tests/test_hardening.py` asserts them.
"""

from __future__ import annotations

import re
import socket
import sqlite3
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx

from benchmarks import hostile_inputs as hostile

BOMB_SECONDS = 2.0
BOMB_RSS_MB = 300.0
FAIR_P99_SECONDS = 1.0
SLOW_CLIENT_SECONDS = 15.0
ORDINARY = hostile.ordinary_png()


@dataclass
class Target:
    url: str
    # a: sends the decode bombs, b: ordinary predicts, c: bursts, d: protocol attacks; and admin.
    # One key per kind of attack, so that one's rate-limit refusals never hide another's defence.
    keys: dict[str, str]
    pid: int | None = None  # the server process, for memory; None for a server elsewhere
    audit_db: Path | None = None  # for "nothing was recorded" checks and file modes
    models: dict[str, str] = field(default_factory=dict)  # modality -> served model name (from /readyz)


@dataclass
class Row:
    attack: str
    status: str
    seconds: float
    rss_mb: float | None
    ok: bool
    detail: str = ""


def key(target: Target, who: str) -> dict[str, str]:
    return {"X-API-Key": target.keys[who]}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Watch:
    """Wall time of a block and the peak growth of the server's resident memory during it."""

    def __init__(self, pid: int | None) -> None:
        self.pid, self.seconds, self.rss_mb = pid, 0.0, None

    @contextmanager
    def measuring(self) -> Iterator[Watch]:
        stop, peak = threading.Event(), [0.0]
        base = _rss_mb(self.pid) if self.pid else 0.0

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], _rss_mb(self.pid))  # type: ignore[arg-type]
                time.sleep(0.01)

        sampler = threading.Thread(target=sample, daemon=True) if self.pid else None
        if sampler:
            sampler.start()
        started = time.perf_counter()
        try:
            yield self
        finally:
            self.seconds = time.perf_counter() - started
            stop.set()
            if sampler:
                sampler.join()
                self.rss_mb = max(0.0, max(peak[0], _rss_mb(self.pid)) - base)  # type: ignore[arg-type]


def bounded(attack: str, target: Target, send: Callable[[], httpx.Response], check=None) -> Row:
    """Sends one hostile request and judges it: a 4xx (or a 200 within budget) in <= 2 s, <= 300 MB."""
    watch = Watch(target.pid)
    with watch.measuring():
        response = send()
    problem = check(response) if check else None
    if response.status_code == 429:
        problem = "rate-limited: the attack never reached its defence"
    ok = (
        response.status_code < 500
        and watch.seconds <= BOMB_SECONDS
        and (watch.rss_mb is None or watch.rss_mb <= BOMB_RSS_MB)
        and not problem
    )
    detail = problem or _error_code(response)
    return Row(attack, str(response.status_code), watch.seconds, watch.rss_mb, ok, detail)


def _error_code(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:60]
    error = body.get("error") if isinstance(body, dict) else None
    return str(error.get("code") if isinstance(error, dict) else error or "")[:80]


def predict(client: httpx.Client, target: Target, who: str, data: bytes, **form: str) -> httpx.Response:
    files = {"file": ("upload", data)}
    return client.post(
        "/v1/predict", headers=key(target, who), data={"modality": "xray", **form}, files=files
    )


def audited(target: Target) -> int | None:
    if target.audit_db is None or not target.audit_db.exists():
        return None
    with sqlite3.connect(target.audit_db) as db:
        return int(db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])


# -- rows ----------------------------------------------------------------------------------------------


def decode_bombs(client: httpx.Client, target: Target) -> list[Row]:
    bombs = {
        "progressive JPEG, 6000x6000, 5,000 scans": hostile.progressive_jpeg_with_scans(),
        "TIFF 2000x2000 x 64 samples (zlib)": hostile.tiff_with_samples(),
        "TIFF ImageDepth 64 x 2000x2000": hostile.tiff_with_depth(),
        "PNG 6320x6320 RGBA, under max_pixels": hostile.png_rgba_under_pixel_limit(),
    }
    return [
        bounded(name, target, lambda data=data: predict(client, target, "a", data))
        for name, data in bombs.items()
    ]


def fairness(target: Target, seconds: float = 3.0) -> Row:
    """Two threads of key a send the scan bomb over and over; key b, at a station's pace (10 a second),
    predicts ordinary images meanwhile: every one answered 200, p99 <= 1 s."""
    bomb, stop = hostile.progressive_jpeg_with_scans(), threading.Event()
    bomb_statuses: list[int] = []

    def bombard() -> None:
        with httpx.Client(base_url=target.url, timeout=60) as client:
            while not stop.is_set():
                bomb_statuses.append(predict(client, target, "a", bomb).status_code)

    latencies, ordinary, started = [], [], time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(bombard) for _ in range(2)]
        with httpx.Client(base_url=target.url, timeout=60) as client:
            while time.perf_counter() - started < seconds:
                begun = time.perf_counter()
                ordinary.append(predict(client, target, "b", ORDINARY).status_code)
                latencies.append(time.perf_counter() - begun)
                time.sleep(max(0.0, 0.1 - latencies[-1]))
        stop.set()
        for future in futures:
            future.result()
    p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) > 1 else latencies[0]
    ok = p99 <= FAIR_P99_SECONDS and set(ordinary) == {200} and all(s < 500 for s in bomb_statuses)
    detail = (
        f"p99 {p99 * 1000:.0f} ms over {len(latencies)} ordinary predicts ({sorted(set(ordinary))}); "
        f"{len(bomb_statuses)} bombs answered {sorted(set(bomb_statuses))}"
    )
    return Row("two bombs in flight, another key's predicts", "p99", p99, None, ok, detail)


def protocol_bodies(client: httpx.Client, target: Target) -> list[Row]:
    infer = f"/v2/models/{target.models['xray']}/infer"

    def post(body: bytes) -> Callable[[], httpx.Response]:
        return lambda: client.post(
            infer, content=body, headers={**key(target, "d"), "content-type": "application/json"}
        )

    rows = [
        bounded("/v2 infer, 100,000 nested [", target, post(hostile.deeply_nested_json())),
        bounded("/v2 infer, 16 MB of [] in parameters", target, post(hostile.json_with_empty_lists())),
        bounded("/v2 infer, 200 BYTES items", target, post(hostile.bytes_items(200, ORDINARY))),
    ]
    before = audited(target)
    rows.append(
        bounded(
            "/v1 predict, 1,000,000-char case_id",
            target,
            lambda: predict(client, target, "d", ORDINARY, case_id="x" * 1_000_000),
        )
    )
    unknown = hostile.bytes_items(1, ORDINARY).replace(
        b'{"inputs"', b'{"outputs": [{"name": "nope"}], "inputs"'
    )
    rows.append(bounded("/v2 infer, unknown output name", target, post(unknown)))
    unchanged = before is None or audited(target) == before
    rows[-1].ok, rows[-1].detail = (
        rows[-1].ok and unchanged,
        rows[-1].detail + ("" if unchanged else "; audited!"),
    )
    return rows


def feedback_across_stations(client: httpx.Client, target: Target) -> Row:
    """Station a confirms station b's verdict: refused like an unknown id, and b's own is accepted."""
    request_id = predict(client, target, "b", ORDINARY).json()["request_id"]
    body = {"request_id": request_id, "confirmed_label": "genuine"}
    watch = Watch(None)
    with watch.measuring():
        foreign = client.post("/v1/feedback", json=body, headers=key(target, "a"))
    own = client.post("/v1/feedback", json=body, headers=key(target, "b"))
    ok = foreign.status_code == 404 and own.status_code == 200
    return Row(
        "feedback on another station's verdict",
        str(foreign.status_code),
        watch.seconds,
        None,
        ok,
        f"own station: {own.status_code}",
    )


def _hold(url: str, head: bytes, trickle: bytes, pause_s: float) -> tuple[float, str]:
    """Sends `head`, then `trickle` one byte every `pause_s`, until the server answers or closes: the
    seconds that took and the answer's status line ("closed" for none)."""
    parsed = urlparse(url)
    started, answer = time.perf_counter(), b""
    with socket.create_connection((parsed.hostname, parsed.port), timeout=SLOW_CLIENT_SECONDS + 5) as sock:
        sock.sendall(head)
        for byte in trickle:
            sock.settimeout(pause_s)
            try:
                answer = sock.recv(4096)
                break  # answered, or closed (b"")
            except TimeoutError:
                pass
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
    status = answer.split(b"\r\n", 1)[0].decode(errors="replace") or "closed"
    return time.perf_counter() - started, status


def _probe_health(url: str, done: threading.Event) -> list[float]:
    """/healthz every 100 ms until `done`: the answers' times."""
    times: list[float] = []
    with httpx.Client(base_url=url, timeout=10) as client:
        while not done.is_set():
            begun = time.perf_counter()
            client.get("/healthz")
            times.append(time.perf_counter() - begun)
            time.sleep(0.1)
    return times


def slow_clients(target: Target, pause_s: float = 3.0) -> list[Row]:
    """Slowloris on the head and on the body, side by side, while /healthz keeps being asked: each must
    be cut off (408 or closed) in <= 15 s without slowing the others."""
    host = f"Host: {urlparse(target.url).hostname}\r\n".encode()
    slow_head = b"POST /v1/predict HTTP/1.1\r\n" + host
    slow_body = (
        b"POST /v1/predict HTTP/1.1\r\n" + host + b"X-API-Key: " + target.keys["d"].encode() + b"\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 400\r\n\r\n"
        b'--b\r\nContent-Disposition: form-data; name="modality"\r\n\r\n'
    )
    done = threading.Event()
    with ThreadPoolExecutor(3) as pool:
        prober = pool.submit(_probe_health, target.url, done)
        head = pool.submit(_hold, target.url, slow_head, b"X-Slow: " + b"s" * 64, pause_s)
        body = pool.submit(_hold, target.url, slow_body, b"x" * 64, pause_s)
        held = {"slow request head": head.result(), "slow request body": body.result()}
        done.set()
        worst = max(prober.result(), default=0.0)
    return [
        Row(
            f"slowloris: {name}, 1 byte / {pause_s:g} s",
            status[9:12] if status.startswith("HTTP/") else status,
            seconds,
            None,
            seconds <= SLOW_CLIENT_SECONDS and (status == "closed" or " 408 " in status) and worst <= 1.0,
            f"/healthz meanwhile: worst {worst * 1000:.0f} ms",
        )
        for name, (seconds, status) in held.items()
    ]


def exposure(client: httpx.Client, target: Target) -> list[Row]:
    def row(attack: str, response: httpx.Response, ok: bool, detail: str = "") -> Row:
        return Row(
            attack,
            str(response.status_code),
            response.elapsed.total_seconds(),
            None,
            ok,
            detail or _error_code(response),
        )

    metrics = client.get("/metrics")
    reload = client.post("/v1/models/reload")
    rebound = client.post("/v1/models/reload", headers={**key(target, "admin"), "Host": "rebind.example"})
    health = client.get("/healthz")
    docs = client.get("/docs")
    foreign = sorted(set(re.findall(r"https?://[^/\"' )]+", docs.text)) - {target.url})
    headers = health.headers
    safe_headers = headers.get("x-content-type-options") == "nosniff" and "frame-ancestors" in headers.get(
        "content-security-policy", ""
    )
    return [
        row("/metrics without a key (keys required)", metrics, metrics.status_code == 401),
        row("anonymous model reload", reload, reload.status_code == 401),
        row("reload with a rebound Host", rebound, rebound.status_code == 400),
        row(
            "/docs assets offline",
            docs,
            docs.status_code == 200 and not foreign,
            f"foreign origins: {foreign}",
        ),
        row(
            "security headers, no server banner",
            health,
            safe_headers and "server" not in headers,
            f"server: {headers.get('server', '-')}",
        ),
    ]


def leaks(client: httpx.Client, target: Target) -> list[Row]:
    garbage = predict(client, target, "a", b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    name = client.post(f"/v2/models/{'m' * 8192}/infer", content=b"{}", headers=key(target, "a"))
    addresses = re.search(r"0x[0-9a-f]{6,}|object at", garbage.text)
    return [
        Row(
            "decoder error wording",
            str(garbage.status_code),
            garbage.elapsed.total_seconds(),
            None,
            400 <= garbage.status_code < 500 and not addresses,
            _error_code(garbage),
        ),
        Row(
            "8 KB unknown model name",
            str(name.status_code),
            name.elapsed.total_seconds(),
            None,
            400 <= name.status_code < 500 and len(name.content) < 1024,
            f"{len(name.content)} bytes answered",
        ),
    ]


def files(target: Target) -> list[Row]:
    if target.audit_db is None:
        return []
    modes = {path.name: path.stat().st_mode & 0o777 for path in target.audit_db.parent.glob("audit.sqlite*")}
    ok = bool(modes) and all(mode == 0o600 for mode in modes.values())
    return [
        Row(
            "audit database and WAL modes",
            "-",
            0.0,
            None,
            ok,
            ", ".join(f"{n} {m:o}" for n, m in modes.items()),
        )
    ]


def rate_limit(target: Target, burst: int = 80) -> Row:
    with httpx.Client(base_url=target.url, timeout=30) as client, ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: predict(client, target, "c", ORDINARY), range(burst)))
    refused = [answer for answer in answers if answer.status_code == 429]
    retry = all(answer.headers.get("retry-after") for answer in refused)
    ok = bool(refused) and retry and all(answer.status_code < 500 for answer in answers)
    return Row(
        f"one key bursts {burst} predicts",
        "429" if refused else "none",
        0.0,
        None,
        ok,
        f"{len(refused)} refused with Retry-After" if retry else "429 without Retry-After",
    )


def readiness(client: httpx.Client) -> Row:
    ready = client.get("/readyz")
    body = ready.json()
    ok = ready.status_code == 200 and bool(body.get("models_dir")) and bool(body.get("defaults"))
    return Row(
        "/readyz names the models folder", str(ready.status_code), 0.0, None, ok, str(body.get("models_dir"))
    )


def run_suite(target: Target) -> list[Row]:
    """Every row, in an order where no attack's refusals spill into the next (key c alone bursts)."""
    with httpx.Client(base_url=target.url, timeout=60) as client:
        target.models = {
            m: name.split("/")[0] for m, name in client.get("/readyz").json()["defaults"].items()
        }
        rows = [readiness(client), *decode_bombs(client, target), fairness(target)]
        rows += [*protocol_bodies(client, target), feedback_across_stations(client, target)]
        rows += [*slow_clients(target), *exposure(client, target), *leaks(client, target), *files(target)]
        rows.append(rate_limit(target))
    return rows
