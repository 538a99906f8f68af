"""Feedback integrity (issue 13, item 3): only the verdict's station or an admin may confirm it, through
the API and through `verity audit confirmed` + `verity data ingest`; conflicts resolve by the documented
rule; audit databases from before senders were recorded are migrated in place and keep working."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from api_fixtures import assert_error, image_bytes, make_settings, predict
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.audit import AuditRecord, FeedbackRecord, SQLiteAuditStore
from verity.api.auth import KeyStore
from verity.api.feedback import CONFLICT_RULE, export_confirmed, may_confirm
from verity.cli import main as verity_main
from verity.datasets.manifest import read_manifest

# The schema as it was before feedback rows recorded their sender's key and role (api/audit.py at d263911).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY, created TEXT NOT NULL, station_id TEXT, case_id TEXT,
    image_sha256 TEXT NOT NULL, modality TEXT NOT NULL, model_name TEXT NOT NULL, model_version TEXT NOT NULL,
    score REAL NOT NULL, verdict TEXT NOT NULL, alarm_threshold REAL NOT NULL, clear_threshold REAL NOT NULL,
    latency_ms REAL NOT NULL, image_path TEXT, api TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS predictions_created ON predictions (created);
CREATE TABLE IF NOT EXISTS feedback (
    id INTEGER PRIMARY KEY AUTOINCREMENT, request_id TEXT NOT NULL REFERENCES predictions (request_id),
    created TEXT NOT NULL, confirmed_label TEXT NOT NULL, case_id TEXT, notes TEXT, station_id TEXT
);
CREATE INDEX IF NOT EXISTS feedback_request ON feedback (request_id);
"""


def keyed_stations(root: Path) -> dict[str, tuple[str, str]]:
    """Station keys for gate-a and gate-b and an admin key: name -> (key id, secret)."""
    store = KeyStore(root / "keys.json")
    keys = {}
    for name, station, role in (
        ("a", "gate-a", "station"),
        ("b", "gate-b", "station"),
        ("admin", "hq", "admin"),
    ):
        key, secret = store.add(station, role=role)
        keys[name] = (key.key_id, secret)
    return keys


def confirm(client: TestClient, secret: str | None, request_id: str, label: str):
    headers = {"X-API-Key": secret} if secret else None
    return client.post(
        "/v1/feedback", json={"request_id": request_id, "confirmed_label": label}, headers=headers
    )


def feedback_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as connection:
        query = "SELECT request_id, confirmed_label, station_id, key_id, role FROM feedback ORDER BY id"
        return connection.execute(query).fetchall()


@pytest.mark.parametrize(
    ("role", "sender", "verdict_station", "allowed"),
    [
        ("station", "gate-b", "gate-b", True),
        ("station", "gate-a", "gate-b", False),
        ("station", "gate-a", None, False),  # a keyed station cannot claim an unowned verdict
        ("admin", "hq", "gate-b", True),
        ("anonymous", None, None, True),  # the console on an unkeyed server, no station typed
        # A station named without a key is a claim: only its key or an admin may label its verdicts,
        # whoever received them (issue 23, finding 9; README's security model).
        ("anonymous", None, "gate-b", False),
        (None, "gate-b", "gate-b", True),  # a row from before senders were recorded, from the station
        (None, "hq", "gate-b", False),  # ... or from elsewhere: an admin then cannot be told apart
    ],
)
def test_who_may_confirm(
    role: str | None, sender: str | None, verdict_station: str | None, allowed: bool
) -> None:
    assert may_confirm(role, sender, verdict_station) is allowed


def test_another_stations_verdict_is_404_and_nothing_is_written(tmp_path: Path, models_dir: Path) -> None:
    keys = keyed_stations(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    with TestClient(create_app(settings)) as client:
        verdict = predict(client, headers={"X-API-Key": keys["b"][1]}).json()
        request_id = verdict["request_id"]
        assert verdict["station_id"] == "gate-b"
        refused = assert_error(
            confirm(client, keys["a"][1], request_id, "genuine"), 404, "unknown_request_id"
        )
        never_issued = assert_error(
            confirm(client, keys["a"][1], "f" * 32, "genuine"), 404, "unknown_request_id"
        )
        # The same answer as for an id that was never issued: the refusal does not reveal the id exists.
        assert refused["error"]["message"].replace(request_id, "ID") == never_issued["error"][
            "message"
        ].replace("f" * 32, "ID")
        assert feedback_rows(settings.audit_db) == []
        assert confirm(client, keys["b"][1], request_id, "counterfeit").status_code == 200
        assert confirm(client, keys["admin"][1], request_id, "genuine").status_code == 200
        assert_error(confirm(client, keys["a"][1], request_id, "genuine"), 404)  # still refused after
    assert feedback_rows(settings.audit_db) == [
        (request_id, "counterfeit", "gate-b", keys["b"][0], "station"),
        (request_id, "genuine", "hq", keys["admin"][0], "admin"),
    ]


def test_anonymous_feedback_on_an_unkeyed_server(client: TestClient, settings) -> None:
    """Without keys there is no identity: an anonymous caller confirms the verdicts recorded without a
    station. One naming a station (typed at the console) is a 403 saying so, one a station key received
    the 404 of an unknown id; that station's key or an admin key still may confirm either."""
    store = KeyStore(settings.keys_file)
    _, gate_b = store.add("gate-b")
    unowned = predict(client).json()["request_id"]
    named = predict(client, station_id="gate-b").json()["request_id"]
    keyed = predict(client, headers={"X-API-Key": gate_b}).json()["request_id"]
    assert confirm(client, None, unowned, "genuine").status_code == 200
    refused = assert_error(confirm(client, None, named, "unsure"), 403, "forbidden")
    assert "gate-b" in refused["error"]["message"] and "without a station" in refused["error"]["message"]
    assert_error(confirm(client, None, keyed, "genuine"), 404, "unknown_request_id")
    assert confirm(client, gate_b, keyed, "counterfeit").status_code == 200
    assert confirm(client, gate_b, named, "counterfeit").status_code == 200
    assert [row[:2] + row[4:] for row in feedback_rows(settings.audit_db)] == [
        (unowned, "genuine", "anonymous"),
        (keyed, "counterfeit", "station"),
        (named, "counterfeit", "station"),
    ]


def test_export_and_ingest_use_authorised_feedback_and_resolve_conflicts(
    tmp_path: Path, models_dir: Path, capsys
) -> None:
    keys = keyed_stations(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    cases = {"single": 0, "admin": 90, "latest": 170, "stolen": 250}  # distinct images, one per case
    with TestClient(create_app(settings)) as client:
        ids = {
            case: predict(
                client, image_bytes(value), headers={"X-API-Key": keys["b"][1]}, case_id=f"SEZ-{case}"
            ).json()["request_id"]
            for case, value in cases.items()
        }
        steps = [
            ("a", "single", "genuine"),  # refused: A's attempt on B's seizure
            ("b", "single", "counterfeit"),
            ("b", "admin", "counterfeit"),
            ("admin", "admin", "genuine"),  # an admin (a lab result) overrules the station ...
            ("b", "admin", "counterfeit"),  # ... even when the station confirms again later
            ("b", "latest", "genuine"),
            ("b", "latest", "counterfeit"),  # the station corrects itself: the latest wins
            ("a", "stolen", "genuine"),  # refused, and the case has no other feedback
        ]
        statuses = [confirm(client, keys[who][1], ids[case], label).status_code for who, case, label in steps]
    assert statuses == [404, 200, 200, 200, 200, 200, 200, 404]

    out = tmp_path / "confirmed"
    assert verity_main(["audit", "confirmed", "--out", str(out), "--db", str(settings.audit_db)]) == 0
    summary = capsys.readouterr().err
    assert "wrote 3 confirmed cases" in summary
    assert (
        f"conflicts: 2 cases with disagreeing confirmations ({CONFLICT_RULE}): 1 decided by an admin, 1"
        in summary
    )
    assert f"to review (decided by the latest, no admin): {ids['latest']}" in summary
    manifest = tmp_path / "manifest.jsonl"
    ingest = ["data", "ingest", str(out / "confirmed.jsonl"), "--out", str(manifest), "--no-progress"]
    assert verity_main(ingest) == 0
    rows = {row.case_id: row for row in read_manifest(manifest)}
    assert {case: row.label for case, row in rows.items()} == {
        "SEZ-single": "counterfeit",
        "SEZ-admin": "genuine",
        "SEZ-latest": "counterfeit",
    }
    assert {case: row.meta["resolution"] for case, row in rows.items()} == {
        "SEZ-single": "single",
        "SEZ-admin": "admin",
        "SEZ-latest": "latest",
    }
    for row in rows.values():  # A's attempts never reach the manifest
        assert row.meta["conflict_rule"] == CONFLICT_RULE and row.meta["station_id"] == "gate-b"
        assert row.meta["confirmed_by"]["station_id"] != "gate-a"
    assert rows["SEZ-admin"].meta["confirmed_by"] == {
        "station_id": "hq",
        "role": "admin",
        "key_id": keys["admin"][0],
    }
    assert rows["SEZ-admin"].meta["confirmations"] == 3


def old_database(root: Path) -> Path:
    """An audit database written by the old schema: three verdicts with stored images, old feedback rows."""
    db = root / "old.sqlite"
    images = root / "images"
    images.mkdir()
    with sqlite3.connect(db) as connection:
        connection.executescript(OLD_SCHEMA)
        for index, (station, value) in enumerate((("gate-1", 0), ("gate-1", 120), (None, 240))):
            image = images / f"{index}.png"
            image.write_bytes(image_bytes(value))
            connection.execute(
                "INSERT INTO predictions VALUES "
                "(?, ?, ?, ?, ?, 'photo', 'photo-test', '2', 0.5, 'uncertain', 0.6, 0.4, 3.0, ?, 'v1')",
                (
                    f"p{index}",
                    f"2026-11-2{index}T10:00:00+00:00",
                    station,
                    f"SEZ-{index}",
                    "ab" * 32,
                    str(image),
                ),
            )
        connection.executemany(
            "INSERT INTO feedback (request_id, created, confirmed_label, station_id) VALUES (?, ?, ?, ?)",
            [
                ("p0", "2026-11-29T11:00:00+00:00", "counterfeit", "gate-1"),  # the verdict's own station
                ("p1", "2026-11-29T11:00:00+00:00", "genuine", "gate-2"),  # another station's: ignored
                ("p2", "2026-11-29T11:00:00+00:00", "genuine", None),  # anonymous on an unowned verdict
            ],
        )
    return db


def test_an_old_database_is_migrated_and_its_rows_treated_by_the_rule(tmp_path: Path) -> None:
    db = old_database(tmp_path)
    store = SQLiteAuditStore(db)
    SQLiteAuditStore(db).close()  # opening it again migrates nothing twice
    with sqlite3.connect(db) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(feedback)")]
    assert columns[-2:] == ["key_id", "role"] and columns.count("key_id") == 1
    assert [row[3:] for row in feedback_rows(db)] == [(None, None)] * 3  # old senders: not recorded
    assert isinstance(store.get("p1"), AuditRecord)
    # A new-style row from another station, written past the API: the export ignores it as well.
    intruder = dict(station_id="gate-9", key_id="k9", role="station")
    store.add_feedback(FeedbackRecord("p0", "2026-11-30T09:00:00+00:00", "genuine", **intruder))
    result = export_confirmed(store, tmp_path / "out")
    store.close()
    assert (result.written, result.unauthorised, result.missing_image) == (2, 2, 0)
    assert "ignored 2 feedback rows from neither the verdict's station nor an admin" in result.summary()
    result.missing_image = 1  # how a case without its image is reported: naming the setting that keeps it
    assert any("VERITY_STORE_IMAGES=1" in line for line in result.summary())
    lines = (tmp_path / "out" / "confirmed.jsonl").read_text().splitlines()
    exported = [json.loads(line) for line in lines]
    assert [(line["meta"]["request_id"], line["label"]) for line in exported] == [
        ("p0", "counterfeit"),
        ("p2", "genuine"),
    ]
    assert exported[0]["meta"]["confirmed_by"] == {"station_id": "gate-1", "role": None, "key_id": None}


def test_the_server_runs_on_an_old_database_and_records_senders(tmp_path: Path, models_dir: Path) -> None:
    db = old_database(tmp_path)
    store = KeyStore(tmp_path / "keys.json")
    gate_1, gate_1_secret = store.add("gate-1")
    _, gate_2_secret = store.add("gate-2")
    with TestClient(create_app(make_settings(tmp_path, audit_db=db, require_api_keys=True))) as client:
        assert_error(confirm(client, gate_2_secret, "p1", "genuine"), 404)
        assert confirm(client, gate_1_secret, "p1", "counterfeit").status_code == 200
    assert feedback_rows(db)[-1] == ("p1", "counterfeit", "gate-1", gate_1.key_id, "station")
    store_after = SQLiteAuditStore(db)
    result = export_confirmed(store_after, tmp_path / "out")
    store_after.close()
    # p1 now has an authorised confirmation; the old gate-2 row beside it is still ignored.
    assert (result.written, result.unauthorised) == (3, 1)
