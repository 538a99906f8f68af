"""The nine findings of issue 23's security review of the live server, one test (or a few) each.

Each test sends what the review sent and checks the answer the fix gives: a 4xx with the route family's
JSON error body, nothing stored that should not be, nothing leaked to the client. Findings 7 and 8, in
what the command line writes, are tests/test_security_findings_cli.py.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from api_fixtures import assert_error, audit_rows, make_settings, predict
from fastapi.testclient import TestClient

from verity.api.app import create_app

# Finding 1: cross-site state-changing requests ---------------------------------------------------------

EVIL = "http://evil.example"


PIXELS = 3 * 32 * 32  # one input of the tiny test models


def fp32_body(data_json: str) -> str:
    """A /v2 infer body of one [1, 3, 32, 32] FP32 image whose data is the JSON text given (which may
    hold what json.dumps never writes: NaN, Infinity, 1e309)."""
    tensor = '{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": ' + data_json + "}"
    return '{"inputs": [' + tensor + "]}"


def oip_text_plain(client: TestClient, headers: dict[str, str]):
    """The /v2 infer a cross-site page can send without a CORS preflight: a text/plain JSON body."""
    body = fp32_body(json.dumps([0.5] * PIXELS))
    return client.post(
        "/v2/models/photo-test/infer", content=body, headers={"content-type": "text/plain", **headers}
    )


@pytest.mark.parametrize(
    "headers",
    [
        {"origin": EVIL},
        {"origin": "null"},  # a sandboxed frame or a file: page
        {"origin": "http://testserver:9000"},  # same host, another port: another origin
        {"origin": "https://testserver.evil.example"},
        {"origin": EVIL, "sec-fetch-site": "cross-site"},
        {"sec-fetch-site": "cross-site"},  # a browser that left Origin out still says where it came from
        {"sec-fetch-site": "same-site"},
    ],
)
def test_cross_site_predict_and_infer_are_refused_and_store_nothing(
    client: TestClient, tmp_path: Path, headers: dict[str, str]
) -> None:
    """A form POST to /v1/predict or a text/plain POST to /v2 infer from another origin is a 403 with
    the route family's error body, and no verdict is written (it would head the console's history)."""
    body = assert_error(
        predict(client, headers=headers, station_id="forged", case_id="forged"), 403, "cross_site_request"
    )
    assert "VERITY_ALLOWED_ORIGINS" in body["error"]["message"]
    refused = oip_text_plain(client, headers)
    assert refused.status_code == 403 and set(refused.json()) == {"error"}, refused.text
    assert audit_rows(tmp_path) == {}


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/predict/batch"),
        ("POST", "/v1/feedback"),
        ("POST", "/v1/models/reload"),
        ("POST", "/v1/references"),
        ("DELETE", "/v1/references/ref-1"),
        ("POST", "/v2/models/photo-test/versions/1/infer"),
        ("PUT", "/v1/feedback"),
        ("PATCH", "/v1/history"),
    ],
)
def test_every_state_changing_route_refuses_another_origin(
    client: TestClient, method: str, path: str
) -> None:
    response = client.request(method, path, headers={"origin": EVIL}, content=b"{}")
    assert response.status_code == 403, response.text
    if not path.startswith("/v2"):
        assert_error(response, 403, "cross_site_request")


def test_same_origin_pages_and_clients_without_origin_pass(client: TestClient, tmp_path: Path) -> None:
    """The console served at / sends its own origin; curl and scanner consoles send none; reads pass."""
    same = predict(client, headers={"origin": "http://testserver", "sec-fetch-site": "same-origin"})
    assert same.status_code == 200, same.text
    assert predict(client).status_code == 200
    assert predict(client, headers={"sec-fetch-site": "none"}).status_code == 200
    assert oip_text_plain(client, {"origin": "http://TestServer"}).status_code == 200
    assert client.get("/v1/history", headers={"origin": EVIL}).status_code == 200
    assert len(audit_rows(tmp_path)) == 4


def test_an_origin_on_another_port_is_refused_on_a_loopback_server(tmp_path: Path, models_dir: Path) -> None:
    """`make serve` answers at 127.0.0.1:8000; a page at 127.0.0.1:3000 is same-site but another origin."""
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        assert predict(client, headers={"origin": "http://127.0.0.1:8000"}).status_code == 200
        other_port = {"origin": "http://127.0.0.1:3000", "sec-fetch-site": "same-site"}
        assert_error(predict(client, headers=other_port), 403, "cross_site_request")
        assert_error(predict(client, headers={"origin": "https://127.0.0.1:3000"}), 403)


def test_configured_origins_are_trusted(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, allowed_origins="https://console.customs.example")
    with TestClient(create_app(settings)) as client:
        trusted = {"origin": "https://console.customs.example", "sec-fetch-site": "cross-site"}
        assert predict(client, headers=trusted).status_code == 200
        assert_error(predict(client, headers={"origin": "https://console.customs.example:8443"}), 403)


# Finding 2: /v2 FP32 values outside [0, 1], and non-finite scores -----------------------------------


def fp32_infer(client: TestClient, data_json: str):
    headers = {"content-type": "application/json"}
    return client.post("/v2/models/photo-test/infer", content=fp32_body(data_json), headers=headers)


def audit_failures(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("verity_audit_failures_total "):
            return float(line.split()[1])
    raise AssertionError("no verity_audit_failures_total in /metrics")


@pytest.mark.parametrize("value", ["3e38", "-3e38", "1.5", "-0.01", "NaN", "Infinity", "1e309"])
def test_fp32_values_outside_0_1_are_422_and_never_scored(
    client: TestClient, tmp_path: Path, value: str
) -> None:
    """3e38 made the model's score NaN; the audit then refused the row: 503 audit_unavailable and an
    audit-failure count that any station could raise. Now the tensor itself is refused."""
    data = "[" + ", ".join([value] + ["0.5"] * (PIXELS - 1)) + "]"
    response = fp32_infer(client, data)
    assert response.status_code == 422, response.text
    message = response.json()["error"]  # the protocol's {"error": "..."}
    assert "holds values from" in message and "[0, 1]" in message or "NaN or infinite" in message
    assert audit_rows(tmp_path) == {} and audit_failures(client) == 0
    assert fp32_infer(client, "[" + ", ".join(["1.0"] * PIXELS) + "]").status_code == 200


def test_a_non_finite_score_never_becomes_a_verdict(
    client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defence in depth: should a model still give NaN, the verdict rule refuses it and the caller gets a
    422 saying so; nothing is audited and the audit log is not blamed."""
    import numpy as np

    from verity.inference import engine
    from verity.inference.engine import Thresholds
    from verity.inference.vocabulary import NonFiniteScore

    with pytest.raises(NonFiniteScore):
        Thresholds(alarm=0.6, clear=0.4).verdict(float("nan"))
    monkeypatch.setattr(engine, "calibrated_scores", lambda logits, t: np.full(len(logits), np.nan))
    assert_error(predict(client), 422, "unscorable_input")
    refused = fp32_infer(client, "[" + ", ".join(["0.5"] * PIXELS) + "]")
    assert refused.status_code == 422 and "no finite score" in refused.json()["error"]
    assert audit_rows(tmp_path) == {} and audit_failures(client) == 0


# Finding 3: /v1/history's cursor and the calendar's edges -----------------------------------------


def cursor_of(document: bytes) -> str:
    return base64.urlsafe_b64encode(document).decode("ascii").rstrip("=")


@pytest.mark.parametrize(
    "before",
    [
        cursor_of(b'["\\ud800", "x"]'),  # a lone surrogate in the cursor's JSON: SQLite cannot bind it
        cursor_of(b'["2026-12-02T00:00:00.000000+00:00", "\\udfff"]'),
        "%ED%A0%80",  # the surrogate's bytes percent-encoded
    ],
)
def test_a_cursor_holding_a_lone_surrogate_is_422(client: TestClient, before: str) -> None:
    body = assert_error(client.get(f"/v1/history?before={before}"), 422, "invalid_fields")
    assert "before" in body["error"]["message"]


@pytest.mark.parametrize(
    ("query", "found"),
    [
        ("until=9999-12-31", 1),  # the calendar's last day has no next midnight
        ("since=0001-01-01T00:00:00%2B01:00", 1),  # an hour before year 1 in UTC
        ("until=9999-12-31T23:00:00-05:00", 1),  # past year 9999 in UTC
        ("until=0001-01-01T00:00:00%2B01:00", 0),
        ("since=9999-12-31", 0),
    ],
)
def test_dates_at_the_calendars_edge_are_answered(client: TestClient, query: str, found: int) -> None:
    assert predict(client).status_code == 200
    response = client.get(f"/v1/history?{query}")
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == found


# Finding 4: hostile file names under /console/ ----------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["%00.js", "app%00.js", "a" * 5000 + ".js", "x/" * 600 + "a.js", "%1b%5b31m.js", "%ED%A0%80.js"],
)
def test_hostile_console_names_are_404_json_without_a_traceback(
    client: TestClient, caplog: pytest.LogCaptureFixture, name: str
) -> None:
    """An embedded NUL or a 5,000-character name made the file system raise: a 500 and two tracebacks."""
    with caplog.at_level("INFO"):
        body = assert_error(client.get(f"/console/{name}"), 404, "not_found")
    assert len(body["error"]["message"]) < 200
    assert not [r for r in caplog.records if r.exc_info or r.levelname in ("ERROR", "CRITICAL")]
    assert client.get("/console/app.js").status_code == 200


# Finding 5: an admin's history filtered by station, and who received each verdict ------------------


def test_an_admins_station_filter_holds_only_that_stations_keyed_verdicts(
    client: TestClient, settings
) -> None:
    """On an unkeyed server anyone may claim a station's name; an auditor filtering by the station gets
    the verdicts its keys received, and every item says who received it."""
    from verity.api.auth import KeyStore

    store = KeyStore(settings.keys_file)
    gate_key, gate_secret = store.add("gate-3")
    _, admin_secret = store.add("hq", role="admin")
    keyed = predict(client, headers={"X-API-Key": gate_secret}).json()["request_id"]
    claimed = predict(client, station_id="gate-3").json()["request_id"]  # anonymous, claiming gate-3

    def items(**params: str) -> dict[str, dict]:
        response = client.get("/v1/history", params=params, headers={"X-API-Key": admin_secret})
        assert response.status_code == 200, response.text
        return {item["request_id"]: item for item in response.json()["items"]}

    assert set(items(station_id="gate-3")) == {keyed}
    everything = items()
    assert set(everything) == {keyed, claimed}
    assert (everything[keyed]["caller_role"], everything[keyed]["key_id"]) == ("station", gate_key.key_id)
    assert (everything[claimed]["caller_role"], everything[claimed]["key_id"]) == ("anonymous", None)
    assert everything[claimed]["station_id"] == "gate-3"
    schema = client.get("/openapi.json").json()["components"]["schemas"]["HistoryItem"]["properties"]
    assert {"caller_role", "key_id"} <= set(schema)


# Finding 6: server file paths in messages to clients ------------------------------------------------


def test_a_damaged_reference_events_file_is_a_503_without_its_path(
    tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store's message names the events file by its absolute path: a station asking for a product
    check read it in the 503. It goes to the log; the client gets fixed words."""
    from verity.inference.references.events import EVENTS_FILE

    references = tmp_path / "refs"
    events = references / "photo-test" / EVENTS_FILE
    events.parent.mkdir(parents=True)
    events.write_text('{"action": "add"}\ngarbage\n')
    settings = make_settings(tmp_path, references_dir=references)
    with TestClient(create_app(settings)) as client, caplog.at_level("ERROR", logger="verity.api"):
        body = assert_error(predict(client, product="acme"), 503, "references_unavailable")
    message = body["error"]["message"]
    assert str(tmp_path) not in message and EVENTS_FILE not in message and "/" not in message
    assert "damaged" in message
    assert any(str(events) in str(getattr(r, "error", "")) for r in caplog.records)


# Finding 9: anonymous feedback on a verdict that named a station --------------------------------------


def test_anonymous_feedback_on_a_station_named_verdict_is_403_and_never_counts(
    client: TestClient, settings
) -> None:
    """README: anonymous callers may confirm only verdicts recorded without a station. The server took
    such feedback; now it is a 403 saying why, and a row accepted before is ignored by the history and
    the export."""
    from verity.api.audit import FeedbackRecord, SQLiteAuditStore
    from verity.api.feedback import resolve

    named = predict(client, station_id="gate-3").json()["request_id"]
    refused = client.post("/v1/feedback", json={"request_id": named, "confirmed_label": "genuine"})
    body = assert_error(refused, 403, "forbidden")
    assert "without a station" in body["error"]["message"]
    assert client.get(f"/v1/history/{named}").json()["feedback"] is None

    store = SQLiteAuditStore(settings.audit_db)  # a row the old rule let in
    old = FeedbackRecord(request_id=named, created="2026-12-02T00:00:00+00:00", confirmed_label="genuine",
                         role="anonymous")
    store.add_feedback(old)
    record = store.get(named)
    store.close()
    assert record is not None and resolve(record, [old]) == (None, 1)
    assert client.get(f"/v1/history/{named}").json()["feedback"] is None


# Housekeeping of issue 23: one version, one name length ------------------------------------------------


def max_length(schema: dict) -> int | None:
    """A string field's maxLength, also when it is optional (anyOf string or null)."""
    options = [schema, *schema.get("anyOf", [])]
    return next((option["maxLength"] for option in options if "maxLength" in option), None)


def test_one_version_and_one_name_length_everywhere(client: TestClient) -> None:
    """The served version is the package's, and a product or model name is NAME_MAX long for the store's
    patterns and for every API field that takes one."""
    from verity import __version__
    from verity.inference.references.names import MODEL_NAME_PATTERN, PRODUCT_PATTERN
    from verity.inference.vocabulary import NAME_MAX

    assert client.get("/v2").json()["version"] == __version__
    document = client.get("/openapi.json").json()
    assert document["info"]["version"] == __version__
    for pattern in (PRODUCT_PATTERN, MODEL_NAME_PATTERN):
        assert pattern.fullmatch("a" * NAME_MAX) and not pattern.fullmatch("a" * (NAME_MAX + 1))
    schemas = document["components"]["schemas"]
    fields = []
    for path in ("/v1/predict", "/v1/predict/batch", "/v1/references"):
        # /v1/predict's `model` is a reference (name/version or name@alias: MODEL_REFERENCE_MAX), not a name.
        names = ("product",) if path == "/v1/predict" else ("product", "model")
        for operation in document["paths"][path].values():
            named = [p for p in operation.get("parameters", []) if p["name"] in names]
            fields += [parameter["schema"] for parameter in named]
            for content in operation.get("requestBody", {}).get("content", {}).values():
                if "$ref" not in content["schema"]:
                    continue  # a raw image body (/v1/predict): its options are query parameters
                body = schemas[content["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]
                fields += [body[name] for name in names if name in body]
    assert len(fields) >= 6 and {max_length(field) for field in fields} == {NAME_MAX}
