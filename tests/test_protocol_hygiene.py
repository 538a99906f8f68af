"""Protocol input hygiene (issue 13): /v2 JSON measured before it is parsed, and parsed off the event loop;
one items cap on every route, checked before anything is decoded; length caps on free strings; requested
outputs and parameters validated before scoring, so only answered verdicts are audited; echoed names cut
short. The event-loop and connection checks run against a live server, the rest in-process."""

from __future__ import annotations

import base64
import http.client
import json
import sqlite3
import struct
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from api_fixtures import DARK, LiveServer, assert_error, audit_rows, make_settings, predict, server_env
from fastapi.testclient import TestClient
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from verity.api import oip_codec, service
from verity.api.app import create_app
from verity.api.errors import ECHO_MAX

INFER = "/v2/models/photo-test/infer"
ENCODED = base64.b64encode(DARK).decode()
MiB = 1024 * 1024


def bytes_request(count: int, shape: list[int] | None = None, **extra) -> dict:
    tensor = {
        "name": "image_bytes",
        "shape": shape or [count],
        "datatype": "BYTES",
        "data": [ENCODED] * count,
    }
    return {"inputs": [tensor], **extra}


def oip_error(response: httpx.Response, status: int) -> str:
    """The OIP error body ({"error": "..."}) with this status, no traceback; its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert "Traceback" not in response.text
    return body["error"]


# The JSON measure, against the parsed structure ------------------------------------------------------

TRICKY_TEXT = st.text(alphabet='[]{}",\\/:ab \n\u00e9\u2028', max_size=8)
JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | TRICKY_TEXT,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TRICKY_TEXT, children, max_size=4),
    max_leaves=40,
)


def depth_and_values(value) -> tuple[int, int]:
    """Nesting depth, and values counted as json_values does (every value, and empty containers twice)."""
    if isinstance(value, list | dict):
        children = list(value.values()) if isinstance(value, dict) else value
        measured = [depth_and_values(child) for child in children]
        depth = 1 + max((d for d, _ in measured), default=0)
        return depth, 1 + sum(v for _, v in measured) + (0 if children else 1)
    return 0, 1


@given(JSON_VALUES, st.booleans(), st.booleans())
@hypothesis_settings(max_examples=300, deadline=None)
def test_json_measure_is_exact_on_valid_json(value, ensure_ascii: bool, escape_slashes: bool) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii)
    if escape_slashes:  # some encoders write "/" as "\/" (a slash only occurs inside strings)
        text = text.replace("/", "\\/")
    skeleton = oip_codec.json_skeleton(text.encode())
    assert (oip_codec.json_depth(skeleton), oip_codec.json_values(skeleton)) == depth_and_values(value)


# Live server: the event loop and the connection ------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("hygiene")
    # The probe below asks /healthz 50 times a second as one anonymous caller: no per-key rate limit.
    live = LiveServer(server_env(root, VERITY_RATE_LIMIT_PER_S="0")).start()
    yield live
    live.stop()


def memory_mb(pid: int) -> tuple[float, float]:
    """(resident, peak resident) MB of a process."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


class HealthProbe(threading.Thread):
    """Asks /healthz every 20 ms from its own connection; keeps the slowest answer's time and the statuses."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.done, self.worst_s, self.statuses = url, threading.Event(), 0.0, []

    def run(self) -> None:
        with httpx.Client(timeout=10) as client:
            while not self.done.is_set():
                started = time.perf_counter()
                self.statuses.append(client.get(self.url + "/healthz").status_code)
                self.worst_s = max(self.worst_s, time.perf_counter() - started)
                time.sleep(0.02)


def post_keeping_connection(connection: http.client.HTTPConnection, path: str, body: bytes):
    connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response, response.read()


@pytest.mark.slow
def test_deep_nesting_is_a_4xx_and_the_connection_stays_open(server: LiveServer) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    connection.connect()
    socket_before = connection.sock
    nested = {10_000: (400, "nests 10,000 deep"), 100_000: (413, "values")}  # 100,000 "[" was a 500
    for levels, (status, words) in nested.items():
        started = time.perf_counter()
        response, body = post_keeping_connection(connection, INFER, b"[" * levels + b"]" * levels)
        assert time.perf_counter() - started <= 2.0
        assert response.status == status and words in json.loads(body)["error"], body
        assert not response.will_close
    inside = {"parameters": {"x": "PLACEHOLDER"}, "inputs": []}
    deep = json.dumps(inside).encode().replace(b'"PLACEHOLDER"', b"[" * 50 + b"]" * 50)
    response, body = post_keeping_connection(connection, INFER, deep)
    assert response.status == 400 and "at most 16 levels" in json.loads(body)["error"]
    connection.request("GET", "/healthz")
    response = connection.getresponse()
    assert response.status == 200 and json.loads(response.read()) == {"status": "ok"}
    assert connection.sock is socket_before  # one connection throughout: none was dropped
    connection.close()


@pytest.mark.slow
def test_16_mb_of_empty_lists_is_refused_without_freezing_the_server(server: LiveServer) -> None:
    bomb = json.dumps({"parameters": {"x": "PLACEHOLDER"}, **bytes_request(1)}).encode()
    bomb = bomb.replace(b'"PLACEHOLDER"', b"[" + b",".join([b"[]"] * (16 * MiB // 3)) + b"]")
    assert len(bomb) >= 16 * MiB
    pid = server.process.pid
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # restart the peak (VmHWM) from now
    resident_before, _ = memory_mb(pid)
    probe = HealthProbe(server.url)
    probe.start()
    time.sleep(0.2)
    started = time.perf_counter()
    response = httpx.post(server.url + INFER, content=bomb, headers={"Content-Type": "application/json"})
    took = time.perf_counter() - started
    time.sleep(0.1)
    probe.done.set()
    probe.join()
    _, peak = memory_mb(pid)
    assert "values" in oip_error(response, 413)  # was a 415 after 3.2 s, RSS +419 MB, /healthz frozen 3 s
    assert took <= 2.0 and peak - resident_before <= 300, (took, peak - resident_before)
    assert len(probe.statuses) >= 10 and set(probe.statuses) == {200}, probe.statuses
    assert probe.worst_s <= 0.2, probe.worst_s


# In-process: counts, lengths, outputs and parameters, echoes -----------------------------------------


class Calls:
    """Counts calls of a wrapped function."""

    def __init__(self, function) -> None:
        self.function, self.count = function, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.function(*args, **kwargs)


@pytest.fixture()
def decodes(monkeypatch) -> dict[str, Calls]:
    """Counters on the base64 decoder of /v2 JSON and on the image decoder of every route."""
    counters = {"base64": Calls(base64.b64decode), "image": Calls(service.prepare_image)}
    monkeypatch.setattr(oip_codec.base64, "b64decode", counters["base64"])
    monkeypatch.setattr(service, "prepare_image", counters["image"])
    return counters


def binary_bytes_request(count: int) -> tuple[bytes, dict[str, str]]:
    blob = b"".join(struct.pack("<I", len(DARK)) + DARK for _ in range(count))
    tensor = {"name": "image_bytes", "shape": [count], "datatype": "BYTES"}
    header = json.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": len(blob)}}]}).encode()
    return header + blob, {
        oip_codec.BINARY_HEADER: str(len(header)),
        "Content-Type": "application/octet-stream",
    }


def test_200_bytes_items_are_refused_before_any_decode(client: TestClient, tmp_path: Path, decodes) -> None:
    assert "200 items sent; at most 16" in oip_error(client.post(INFER, json=bytes_request(200)), 422)
    body, headers = binary_bytes_request(200)
    assert "at most 16" in oip_error(client.post(INFER, content=body, headers=headers), 422)
    fp32 = {"inputs": [{"name": "image", "shape": [17, 3, 32, 32], "datatype": "FP32", "data": [0.0]}]}
    assert "17 items sent" in oip_error(client.post(INFER, json=fp32), 422)
    assert decodes["base64"].count == decodes["image"].count == 0 and audit_rows(tmp_path) == {}
    # At the cap, every item is decoded once and answered (the counters see decodes when there are any).
    assert client.post(INFER, json=bytes_request(16)).status_code == 200
    assert decodes["base64"].count == decodes["image"].count == 16 and len(audit_rows(tmp_path)) == 16


def test_one_items_cap_for_v1_batches_and_v2_inputs(tmp_path: Path, models_dir: Path, decodes) -> None:
    with TestClient(create_app(make_settings(tmp_path, max_batch_files=2))) as client:
        files = [("files", (f"{i}.png", DARK)) for i in range(3)]
        batch = client.post("/v1/predict/batch", data={"modality": "photo"}, files=files)
        assert "3 items sent; at most 2" in assert_error(batch, 422, "too_many_files")["error"]["message"]
        assert "3 items sent; at most 2" in oip_error(client.post(INFER, json=bytes_request(3)), 422)
        assert decodes["image"].count == 0
        assert client.post(INFER, json=bytes_request(2)).status_code == 200


def v2_rows(root: Path) -> list[tuple]:
    with sqlite3.connect(root / "audit.sqlite") as db:
        return db.execute(
            "SELECT request_id, case_id, station_id FROM predictions WHERE api = 'v2'"
        ).fetchall()


def test_long_case_id_and_station_are_refused_and_nothing_is_stored(
    client: TestClient, tmp_path: Path
) -> None:
    refused = [
        {"case_id": "C" * 1_000_000},  # was stored whole
        {"case_id": "C" * 201},
        {"station_id": "S" * 101},
        {"case_id": 12},
        {"note": "N" * 201},
    ]
    for parameters in refused:
        message = oip_error(client.post(INFER, json=bytes_request(1, parameters=parameters)), 400)
        assert message.startswith("Invalid inference request: parameters.") and len(message) < 200, message
    assert v2_rows(tmp_path) == []
    accepted = client.post(
        INFER, json=bytes_request(1, parameters={"case_id": "C" * 200, "station_id": "gate-7"})
    )
    assert accepted.status_code == 200, accepted.text
    assert [row[1:] for row in v2_rows(tmp_path)] == [("C" * 200, "gate-7")]


def test_v1_free_strings_have_the_same_caps(client: TestClient, tmp_path: Path) -> None:
    assert_error(predict(client, DARK, case_id="C" * 201), 422, "invalid_fields")
    assert_error(predict(client, DARK, station_id="S" * 101), 422, "invalid_fields")
    assert audit_rows(tmp_path) == {}
    request_id = predict(client, DARK, case_id="C" * 200).json()["request_id"]
    for field, size in (("case_id", 201), ("notes", 4001)):
        feedback = {"request_id": request_id, "confirmed_label": "genuine", field: "x" * size}
        assert_error(client.post("/v1/feedback", json=feedback), 422, "invalid_fields")


def test_outputs_and_parameters_are_checked_before_scoring(client: TestClient, tmp_path: Path) -> None:
    refused = [
        ({"outputs": [{"name": "nope"}]}, "Unknown output(s) 'nope'"),  # was audited with a verdict
        ({"outputs": [{"name": "score"}] * 8}, "outputs"),
        ({"outputs": [{"name": "score", "parameters": {"binary_data": "yes"}}]}, "binary_data"),
        ({"parameters": {"binary_data_output": "yes"}}, "binary_data_output"),
        ({"parameters": {f"p{i}": i for i in range(17)}}, "at most 16 parameters"),
        ({"parameters": {"x": [[]]}}, "a parameter is a boolean, a number or a string"),
        ({"id": "i" * 101}, "id"),
    ]
    for extra, words in refused:
        assert words in oip_error(client.post(INFER, json=bytes_request(1, **extra)), 400)
    assert audit_rows(tmp_path) == {}
    answered = client.post(
        INFER, json=bytes_request(1, outputs=[{"name": "verdict"}], parameters={"priority": 1})
    )
    assert [o["name"] for o in answered.json()["outputs"]] == ["verdict"]
    assert list(audit_rows(tmp_path)) == [answered.headers["x-request-id"]]


def test_echoed_names_are_cut_short(client: TestClient) -> None:
    name = "m" * 8192  # was echoed whole
    for response in (
        client.post(f"/v2/models/{name}/infer", json=bytes_request(1)),
        client.get(f"/v2/models/{name}"),
    ):
        message = oip_error(response, 404)
        assert f"'{'m' * ECHO_MAX}...'" in message and len(response.content) < 300
    long_key = {"parameters": {"k" * 10_000: 1}}
    message = oip_error(client.post(INFER, json=bytes_request(1, **long_key)), 400)
    assert "k" * ECHO_MAX + "..." in message and len(message) < 300
    many = {"inputs": [{"name": "x" * 65, "shape": [1], "datatype": "BYTES"}] * 1000}
    message = oip_error(client.post(INFER, json=many), 400)
    assert message.endswith("and 997 more") and len(message) < 400
    files = [("files", ("f" * 1000 + ".png", DARK, "image/png"))]  # a longer part header is refused
    batch = client.post("/v1/predict/batch", data={"modality": "photo"}, files=files)
    assert batch.json()["results"][0]["filename"] == "f" * 255 + "..."
    feedback = client.post(
        "/v1/feedback", json={"request_id": "r", "confirmed_label": "genuine", "z" * 10_000: 1}
    )
    assert len(assert_error(feedback, 422, "invalid_fields")["error"]["message"]) < 300


def test_malformed_bodies_are_fixed_wording_4xx(client: TestClient) -> None:
    cases = [
        (b"{nope", {}, "not valid JSON (at character 1)"),
        (b"\xff\xfe\x00", {}, "not valid JSON"),
        (b"{}", {oip_codec.BINARY_HEADER: "many"}, "must be a whole number of bytes"),
        (
            json.dumps({"inputs": [{**bytes_request(1)["inputs"][0], "data": ["no!"]}]}).encode(),
            {},
            "element 0",
        ),
    ]
    for body, headers, words in cases:
        response = client.post(INFER, content=body, headers={"Content-Type": "application/json", **headers})
        assert words in oip_error(response, 400)
    shapes = {"inputs": [{"name": "image", "shape": [-1, 3, 32, 32], "datatype": "FP32", "data": []}]}
    assert "greater than or equal to 0" in oip_error(client.post(INFER, json=shapes), 400)
    tensor = np.zeros((1, 3, 32, 32), dtype="<f4")
    fp32 = {
        "inputs": [
            {"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": tensor.ravel().tolist()}
        ]
    }
    assert client.post(INFER, json=fp32).status_code == 200
    assert client.post(INFER, json=bytes_request(1, shape=[1, 1])).status_code == 200
