"""The inspection console's server side (issue 15): GET /v1/history and its scope, who received each
verdict (audit key_id and caller_role) and the unsure confirmation. view_png, the console's files and
the numbers in error details: tests/test_console_api.py."""

from __future__ import annotations

import base64
import sqlite3
from pathlib import Path

import pytest
from api_fixtures import (
    DARK,
    assert_error,
    image_bytes,
    make_settings,
    predict,
)
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.audit import AuditRecord, SQLiteAuditStore
from verity.api.auth import KeyStore
from verity.api.feedback import export_confirmed


def keys(root: Path) -> dict[str, str]:
    """Secrets of station keys gate-a and gate-b and an admin key (station hq)."""
    store = KeyStore(root / "keys.json")
    return {
        name: store.add(station, role=role)[1]
        for name, station, role in (
            ("a", "gate-a", "station"),
            ("b", "gate-b", "station"),
            ("admin", "hq", "admin"),
        )
    }


def auth(secret: str | None) -> dict[str, str] | None:
    return {"X-API-Key": secret} if secret else None


def history(client: TestClient, secret: str | None = None, **params: object):
    return client.get("/v1/history", params={k: str(v) for k, v in params.items()}, headers=auth(secret))


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["request_id"] for item in response.json()["items"]]


def receivers(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT request_id, station_id, key_id, caller_role FROM predictions")
        return {row[0]: row[1:] for row in rows}


V2_BODY = {
    "inputs": [
        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(DARK).decode()]}
    ]
}


def test_a_station_sees_only_its_own_verdicts_and_an_admin_sees_all(tmp_path: Path, models_dir: Path) -> None:
    secrets = keys(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    with TestClient(create_app(settings)) as client:
        a = [predict(client, headers=auth(secrets["a"])).json()["request_id"] for _ in range(2)]
        b = [predict(client, headers=auth(secrets["b"]), case_id="SEZ-1").json()["request_id"]]
        batch = client.post(
            "/v1/predict/batch",
            files=[("files", ("1.png", DARK, "image/png")), ("files", ("2.png", DARK, "image/png"))],
            data={"modality": "photo"},
            headers=auth(secrets["b"]),
        ).json()
        b += [item["result"]["request_id"] for item in batch["results"]]
        v2 = client.post("/v2/models/photo-test/infer", json=V2_BODY, headers=auth(secrets["b"]))
        assert v2.status_code == 200, v2.text
        b.append(v2.headers["x-request-id"])  # one image: its audit row has the request's id

        assert set(ids(history(client, secrets["a"]))) == set(a)
        assert set(ids(history(client, secrets["b"]))) == set(b)
        assert set(ids(history(client, secrets["admin"]))) == set(a + b)
        assert set(ids(history(client, secrets["admin"], station_id="gate-b"))) == set(b)
        assert set(ids(history(client, secrets["a"], station_id="gate-a"))) == set(a)
        assert_error(history(client, secrets["a"], station_id="gate-b"), 403, "forbidden")
        assert_error(history(client), 401, "unauthorized")
        assert_error(history(client, "vk_nope_nope"), 401, "unauthorized")

        # One record: the same scope, and another station's verdict is the 404 of an unknown id.
        one = client.get(f"/v1/history/{b[0]}", headers=auth(secrets["b"]))
        assert one.status_code == 200 and one.json()["case_id"] == "SEZ-1"
        assert one.json() == next(
            i for i in history(client, secrets["b"]).json()["items"] if i["request_id"] == b[0]
        )
        assert client.get(f"/v1/history/{b[0]}", headers=auth(secrets["admin"])).status_code == 200
        hidden = assert_error(
            client.get(f"/v1/history/{b[0]}", headers=auth(secrets["a"])), 404, "unknown_request_id"
        )
        unknown = assert_error(client.get(f"/v1/history/{'f' * 32}", headers=auth(secrets["a"])), 404)
        assert hidden["error"]["message"].replace(b[0], "ID") == unknown["error"]["message"].replace(
            "f" * 32, "ID"
        )
        assert_error(client.get(f"/v1/history/{b[0]}"), 401)

    # Every route that answers a verdict recorded who received it: /v1, the batch and /v2.
    rows = receivers(settings.audit_db)
    key_ids = {key.station_id: key.key_id for key in KeyStore(settings.keys_file).list_keys()}
    assert {rows[i] for i in a} == {("gate-a", key_ids["gate-a"], "station")}
    assert {rows[i] for i in b} == {("gate-b", key_ids["gate-b"], "station")}
    assert len(b) == 4


def test_history_item_fields(client: TestClient) -> None:
    answer = predict(client, station_id="gate-3", case_id="SEZ-9").json()
    (item,) = history(client).json()["items"]
    assert set(item) == {
        "request_id",
        "created",
        "station_id",
        "case_id",
        "product",
        "modality",
        "verdict",
        "score",
        "thresholds",
        "recognised",
        "novelty",
        "reasons",
        "model",
        "reference_status",
        "reference_distance",
        "reference_threshold",
        "image_sha256",
        "api",
        "caller_role",
        "key_id",
        "report_uid",
        "feedback",
    }
    for name in (
        "request_id",
        "station_id",
        "case_id",
        "product",
        "modality",
        "verdict",
        "score",
        "thresholds",
        "recognised",
        "novelty",
        "reasons",
        "model",
        "image_sha256",
    ):
        assert item[name] == answer[name], name
    assert item["api"] == "v1" and item["feedback"] is None and item["reference_status"] is None
    assert item["caller_role"] == "anonymous" and item["key_id"] is None
    assert item["created"].endswith("+00:00")


def test_anonymous_history_holds_only_verdicts_received_anonymously(client: TestClient, settings) -> None:
    """On an unkeyed server (make serve) the console has no key: it sees the verdicts received without
    one, and a station name typed there never puts a verdict in that station's keyed history."""
    _, gate_a = KeyStore(settings.keys_file).add("gate-a")
    anonymous = [
        predict(client).json()["request_id"],
        predict(client, station_id="gate-a").json()["request_id"],
    ]
    keyed = predict(client, headers=auth(gate_a)).json()["request_id"]
    assert set(ids(history(client))) == set(anonymous)
    assert ids(history(client, station_id="gate-a")) == [anonymous[1]]  # a filter within its own
    assert ids(history(client, gate_a)) == [keyed]
    assert_error(client.get(f"/v1/history/{keyed}"), 404, "unknown_request_id")
    assert client.get(f"/v1/history/{anonymous[1]}").status_code == 200
    assert_error(client.get(f"/v1/history/{anonymous[1]}", headers=auth(gate_a)), 404)


def record(
    request_id: str,
    created: str,
    verdict: str = "genuine",
    recognised: bool | None = True,
    station: str | None = None,
    role: str | None = "anonymous",
) -> AuditRecord:
    return AuditRecord(
        request_id=request_id,
        created=created,
        station_id=station,
        case_id=None,
        image_sha256="ab" * 32,
        modality="photo",
        model_name="photo-test",
        model_version="2",
        score=0.5,
        verdict=verdict,
        alarm_threshold=0.6,
        clear_threshold=0.4,
        latency_ms=1.0,
        recognised=recognised,
        reasons="" if verdict == "genuine" else "classifier",
        caller_role=role,
    )


def test_paging_is_newest_first_without_duplicates(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path)
    store = SQLiteAuditStore(settings.audit_db)
    # Three records share each second: the request id breaks the tie, so no page repeats or skips one.
    records = [record(f"r{i:02d}", f"2026-11-29T10:00:{i // 3:02d}.000000+00:00") for i in range(45)]
    store.record(records[::2])
    store.record(records[1::2])
    store.record([record("keyed", "2026-11-29T11:00:00.000000+00:00", station="gate-a", role="station")])
    store.close()
    expected = [r.request_id for r in sorted(records, key=lambda r: (r.created, r.request_id), reverse=True)]
    pages, cursor = [], None
    with TestClient(create_app(settings)) as client:
        while True:
            params = {"before": cursor} if cursor else {}
            body = history(client, **params).json()
            assert body["limit"] == 20
            pages.append([item["request_id"] for item in body["items"]])
            cursor = body["next"]
            if cursor is None:
                break
        assert [len(page) for page in pages] == [20, 20, 5]
        assert sum(pages, []) == expected
        assert ids(history(client, limit=100)) == expected
        assert ids(history(client, limit=1)) == expected[:1]


def test_verdict_and_date_filters(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path)
    store = SQLiteAuditStore(settings.audit_db)
    store.record(
        [
            record("g28", "2026-11-28T23:59:59.999999+00:00", "genuine"),
            record("c29", "2026-11-29T00:00:00.000000+00:00", "counterfeit"),
            record("u29", "2026-11-29T12:00:00.000000+00:00", "uncertain", recognised=True),
            record("n29", "2026-11-29T23:59:59.999999+00:00", "uncertain", recognised=False),
            record(
                "o30", "2026-11-30T00:00:00.000000+00:00", "uncertain", recognised=None
            ),  # no novelty gate
        ]
    )
    store.close()
    with TestClient(create_app(settings)) as client:
        assert ids(history(client, verdict="genuine")) == ["g28"]
        assert ids(history(client, verdict="counterfeit")) == ["c29"]
        assert ids(history(client, verdict="uncertain")) == ["o30", "u29"]
        assert ids(history(client, verdict="not_recognised")) == ["n29"]
        # A date `until` includes its whole day; a datetime bound is itself included.
        assert ids(history(client, since="2026-11-29", until="2026-11-29")) == ["n29", "u29", "c29"]
        assert ids(history(client, until="2026-11-29T12:00:00Z")) == ["u29", "c29", "g28"]
        assert ids(history(client, since="2026-11-29T12:00:00")) == ["o30", "n29", "u29"]  # naive is UTC
        assert ids(history(client, since="2026-11-29T17:00:00+05:00")) == ["o30", "n29", "u29"]
        assert ids(history(client, since="2026-11-29", verdict="uncertain")) == ["o30", "u29"]
        assert ids(history(client, since="2026-12-01")) == []
        assert ids(history(client, until="20261128")) == ["g28"]  # a basic-format date is a whole day too


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "many"},
        {"verdict": "fake"},
        {"since": "yesterday"},
        {"until": "2026-13-01"},
        {"before": "not-a-cursor"},
        {"before": base64.urlsafe_b64encode(b"[1]").decode()},
        {"station_id": "s" * 101},
    ],
)
def test_bad_history_parameters_are_422_json(client: TestClient, params: dict) -> None:
    assert_error(history(client, **params), 422, "invalid_fields")


def test_bad_record_id_is_422_json(client: TestClient) -> None:
    assert_error(client.get(f"/v1/history/{'x' * 101}"), 422, "invalid_fields")


def confirm(
    client: TestClient, request_id: str, label: str, secret: str | None = None, notes: str | None = None
):
    body = {"request_id": request_id, "confirmed_label": label, "notes": notes}
    return client.post("/v1/feedback", json=body, headers=auth(secret))


def test_feedback_shows_in_history_and_unsure_is_never_training_data(
    tmp_path: Path, models_dir: Path
) -> None:
    secrets = keys(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    with TestClient(create_app(settings)) as client:
        unsure, seized, overruled = (
            predict(client, image_bytes(v), headers=auth(secrets["b"])).json()["request_id"]
            for v in (10, 90, 170)
        )
        assert confirm(client, unsure, "counterfeit", secrets["b"]).status_code == 200
        response = confirm(client, unsure, "unsure", secrets["b"], notes="<b>smudged</b> label")
        assert response.status_code == 200 and response.json()["confirmed_label"] == "unsure"
        assert confirm(client, seized, "counterfeit", secrets["b"]).status_code == 200
        assert confirm(client, overruled, "counterfeit", secrets["b"]).status_code == 200
        assert confirm(client, overruled, "genuine", secrets["admin"]).status_code == 200
        assert_error(confirm(client, seized, "maybe", secrets["b"]), 422)
        items = {item["request_id"]: item for item in history(client, secrets["b"]).json()["items"]}
        assert items[unsure]["feedback"]["confirmed_label"] == "unsure"  # the station's latest
        assert items[unsure]["feedback"]["notes"] == "<b>smudged</b> label"
        assert items[seized]["feedback"] == {
            "confirmed_label": "counterfeit",
            "created": items[seized]["feedback"]["created"],
            "notes": None,
            "station_id": "gate-b",
            "role": "station",
        }
        assert items[overruled]["feedback"]["confirmed_label"] == "genuine"  # the admin's wins
        assert items[overruled]["feedback"]["role"] == "admin"
        one = client.get(f"/v1/history/{unsure}", headers=auth(secrets["admin"])).json()
        assert one["feedback"]["confirmed_label"] == "unsure"
    store = SQLiteAuditStore(settings.audit_db)
    result = export_confirmed(store, tmp_path / "out")
    store.close()
    assert (result.written, result.unsure) == (2, 1)
    assert "skipped 1 confirmed as unsure (cannot tell): no label to train on" in result.summary()
    exported = (tmp_path / "out" / "confirmed.jsonl").read_text()
    assert unsure not in exported and seized in exported and "unsure" not in exported


def test_an_old_database_gains_the_receiver_columns(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    store = SQLiteAuditStore(db)
    store.record([record("old", "2026-11-29T10:00:00.000000+00:00", role=None, station="gate-a")])
    store.close()
    with sqlite3.connect(db) as connection:  # as a database from before issue 15 would be
        connection.execute("ALTER TABLE predictions DROP COLUMN caller_role")
        connection.execute("ALTER TABLE predictions DROP COLUMN key_id")
    store = SQLiteAuditStore(db)
    SQLiteAuditStore(db).close()
    with sqlite3.connect(db) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(predictions)")]
    assert columns[-2:] == ["key_id", "caller_role"] and columns.count("key_id") == 1
    old = store.get("old")
    store.close()
    assert old is not None and (old.key_id, old.caller_role) == (None, None)


def test_openapi_documents_the_history(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    listing = document["paths"]["/v1/history"]["get"]
    assert listing["tags"] == ["history"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/HistoryPage"
    )
    assert {p["name"] for p in listing["parameters"]} == {
        "limit",
        "before",
        "verdict",
        "since",
        "until",
        "station_id",
    }
    one = document["paths"]["/v1/history/{request_id}"]["get"]
    assert one["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/HistoryItem")
    assert "view_png" in document["components"]["schemas"]["PredictionResult"]["properties"]
    feedback = document["components"]["schemas"]["FeedbackIn"]["properties"]["confirmed_label"]
    assert feedback["enum"] == ["genuine", "counterfeit", "unsure"]
    assert "/" not in document["paths"] and not any(p.startswith("/console") for p in document["paths"])
