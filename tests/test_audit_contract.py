"""The audit store contract, run on SQLite and on a real PostgreSQL server (tests/postgres_fixtures.py),
and what only a shared database needs: URLs that cannot be opened, schema versions, the migration.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import image_bytes, make_models_dir, make_settings
from fastapi.testclient import TestClient
from postgres_fixtures import PostgresServer, require_postgres, start_postgres
from test_audit import record

from verity.api.app import create_app
from verity.api.audit import (
    AuditError,
    FeedbackRecord,
    HistoryQuery,
    ModelEvent,
    ReferenceEvent,
    ShadowRecord,
    open_audit_store,
)
from verity.api.audit_records import Alert, AlertDelivery, current_aliases
from verity.api.settings import Settings
from verity.cli import main as verity_main

pytestmark = pytest.mark.slow
STORES = ("sqlite", "postgresql")


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    server = start_postgres(require_postgres())
    yield server
    server.stop()


@pytest.fixture()
def database(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """VERITY_AUDIT_DB of a fresh, empty store of the kind the test is parametrized with."""
    if request.param == "sqlite":
        return str(tmp_path / "audit.sqlite")
    server = request.getfixturevalue("postgres")
    return server.create_database(f"t_{abs(hash(request.node.nodeid)) % 10**12}")


@pytest.fixture()
def store(database: str) -> Iterator[Any]:
    opened = open_audit_store(Settings(audit_db=database))
    yield opened
    opened.close()


def times(n: int) -> list[str]:
    return [f"2026-11-29T10:00:{i:02d}.000000+00:00" for i in range(n)]


# ---------------------------------------------------------------------------------------------- contract
@pytest.mark.parametrize("database", STORES, indirect=True)
def test_a_record_comes_back_as_it_was_written(store: Any) -> None:
    full = record(
        "r-full", recognised=False, novelty=0.123456789012345, reasons="not_recognised", product="velmor-tea",
        reference_status="abstained", reference_distance=0.25, reference_threshold=0.5, reference_count=3,
        key_id="k1", caller_role="station", image_path="/var/images/ab.png", api="v2",
        score=0.987654321012345,
    )  # fmt: skip
    store.record([full, record("r-bare")])
    assert store.get("r-full") == full
    assert store.get("r-bare") == record("r-bare")
    assert store.get("r-missing") is None
    assert store.count() == 2


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_a_batch_is_written_whole_or_not_at_all(store: Any) -> None:
    store.record([record("r-1")])
    with pytest.raises(AuditError, match="could not be written"):
        store.record([record("r-2"), record("r-1")])  # a duplicate id fails the whole batch
    assert store.get("r-2") is None and store.count() == 1


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_history_pages_and_filters_alike(store: Any) -> None:
    stamps = times(6)
    rows = [
        record(f"r-{i}", created=stamps[i], station_id="gate-1" if i % 2 else "gate-2",
               verdict=("genuine", "counterfeit", "uncertain")[i % 3], recognised=i != 5,
               caller_role="anonymous" if i == 4 else "station", product=("tea", "coffee", None)[i % 3])
        for i in range(6)
    ]  # fmt: skip
    store.record(rows)
    first = store.history(HistoryQuery(limit=4))
    assert [r.request_id for r in first] == ["r-5", "r-4", "r-3", "r-2"]
    rest = store.history(HistoryQuery(limit=4, before=(first[-1].created, first[-1].request_id)))
    assert [r.request_id for r in rest] == ["r-1", "r-0"]
    gate = store.history(HistoryQuery(limit=10, station_id="gate-1"))
    assert [r.request_id for r in gate] == ["r-5", "r-3", "r-1"]
    assert [r.request_id for r in store.history(HistoryQuery(limit=10, verdict="not_recognised"))] == ["r-5"]
    assert [r.request_id for r in store.history(HistoryQuery(limit=10, callers="anonymous"))] == ["r-4"]
    # A right holder's history: its products' verdicts only (none at all for a key with none).
    products = store.history(HistoryQuery(limit=10, products=("tea", "coffee")))
    assert [r.request_id for r in products] == ["r-4", "r-3", "r-1", "r-0"]
    assert store.history(HistoryQuery(limit=10, products=())) == []
    window = HistoryQuery(limit=10, since=stamps[1], until=stamps[3], until_exclusive=True)
    assert [r.request_id for r in store.history(window)] == ["r-2", "r-1"]
    assert [r.request_id for r in store.since(stamps[4])] == ["r-4", "r-5"]


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_feedback_and_confirmed_cases(store: Any) -> None:
    store.record([record("r-1", created=times(2)[0]), record("r-2", created=times(2)[1])])
    first = FeedbackRecord("r-1", "2026-11-29T11:00:00+00:00", "counterfeit", "SEZ-1", "seal", "gate-1", "k1",
                           "station")  # fmt: skip
    second = replace(first, created="2026-11-29T12:00:00+00:00", confirmed_label="genuine", notes=None)
    store.add_feedback(first)
    store.add_feedback(second)
    assert store.feedback_for(["r-1", "r-2", "r-none"]) == {"r-1": [first, second]}
    assert store.feedback_for([]) == {}
    cases = list(store.confirmed_cases())
    assert [(case.request_id, rows) for case, rows in cases] == [("r-1", [first, second])]
    with pytest.raises(AuditError):
        store.add_feedback(replace(first, request_id="r-never-audited"))


def alert(alert_id: str, request_id: str, created: str, endpoint: str = "acme") -> Alert:
    return Alert(alert_id, created, "seizure.confirmed", endpoint, request_id, json.dumps({"id": alert_id}))


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_alerts_are_written_with_their_confirmation_or_not_at_all(store: Any) -> None:
    stamps = times(3)
    store.record([record("r-1", created=stamps[0])], [alert("a-alarm", "r-1", stamps[0], "agency")])
    confirmation = FeedbackRecord("r-1", stamps[1], "counterfeit", role="station")
    raised = [alert("a-1", "r-1", stamps[1]), alert("a-2", "r-1", stamps[1], "agency")]
    store.add_feedback(confirmation, raised)
    store.add_feedback(confirmation, [alert("a-1", "r-1", stamps[2])])  # the same alert again: kept once
    with pytest.raises(AuditError):  # the confirmation fails, so its alert is not written either
        store.add_feedback(replace(confirmation, request_id="r-never"), [alert("a-3", "r-1", stamps[2])])
    with pytest.raises(AuditError):  # a verdict batch that fails takes its alerts with it
        store.record([record("r-1")], [alert("a-4", "r-1", stamps[2])])
    assert sorted(a.alert_id for a in store.alerts()) == ["a-1", "a-2", "a-alarm"]
    assert store.alert("a-1").created == stamps[1] and store.alert("a-3") is None
    assert [a.alert_id for a in store.alerts("pending", limit=2)] == ["a-1", "a-2"]  # newest first


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_a_claimed_alert_goes_to_one_dispatcher_until_its_lease_ends(store: Any, database: str) -> None:
    stamps = times(4)
    store.record([record("r-1", created=stamps[0])])
    store.add_feedback(FeedbackRecord("r-1", stamps[0], "counterfeit"),
                       [alert(f"a-{i}", "r-1", stamps[i]) for i in range(4)])  # fmt: skip
    other = open_audit_store(Settings(audit_db=database))  # a second worker's connection
    try:
        mine = store.claim_alerts(100.0, 30.0, 3)
        theirs = other.claim_alerts(100.0, 30.0, 3)
        assert [a.alert_id for a in mine] == ["a-0", "a-1", "a-2"] and [a.alert_id for a in theirs] == ["a-3"]
        assert other.claim_alerts(129.0, 30.0, 10) == []  # every lease still runs
        delivery = AlertDelivery("a-0", stamps[1], 1, 200, None, 12.5)
        store.finish_attempt(delivery, "delivered", 101.0)
        store.finish_attempt(AlertDelivery("a-1", stamps[1], 1, 503, None, 3.0), "pending", 200.0)
        assert [a.alert_id for a in other.claim_alerts(131.0, 30.0, 10)] == ["a-2", "a-3"]  # lapsed leases
        for alert_id in ("a-2", "a-3"):
            other.finish_attempt(AlertDelivery(alert_id, stamps[1], 1, 204, None, 1.0), "delivered", 132.0)
        assert [a.alert_id for a in other.claim_alerts(201.0, 30.0, 10)] == ["a-1"]  # due again
        done, retried = store.alert("a-0"), store.alert("a-1")
        assert (done.status, done.attempts, done.delivered) == ("delivered", 1, stamps[1])
        assert done.claimed_until is None
        assert (retried.status, retried.attempts, retried.last_error) == ("pending", 1, "HTTP 503")
        assert store.alert_deliveries("a-0") == [delivery]
        store.finish_attempt(AlertDelivery("a-1", stamps[2], 2, None, "refused", 1.0), "failed", 300.0)
        assert store.retry_alerts(None, 400.0) == 1 and store.alert("a-1").attempts == 0
        assert store.retry_alerts(["a-0", "a-none"], 400.0) == 1  # a named one is sent again, even delivered
        assert {a.alert_id for a in store.claim_alerts(400.0, 30.0, 10)} == {"a-0", "a-1"}
    finally:
        other.close()


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_reference_events_in_order(store: Any) -> None:
    events = [
        ReferenceEvent(f"2026-11-29T10:00:0{i}+00:00", action, model, "velmor-tea", "cd" * 32, f"ref-{i}",
                       "cli:brand", "admin", f"photo-{i}.jpg")
        for i, (action, model) in enumerate([("add", "photo-a"), ("add", "photo-b"), ("remove", "photo-a")])
    ]  # fmt: skip
    for event in events:
        store.record_reference_event(event)
    assert store.reference_events() == events
    assert store.reference_events("photo-a") == [events[0], events[2]]


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_shadow_answers_come_back_and_need_an_audited_request(store: Any) -> None:
    stamps = times(3)
    store.record([record("r-0", created=stamps[0]), record("r-1", created=stamps[1])])
    shadows = [ShadowRecord("r-0", stamps[1], "cand", "2", 0.25, "genuine", True),
               ShadowRecord("r-1", stamps[2], "cand", "2", 0.5, "uncertain", None)]  # fmt: skip
    for shadow in shadows:
        store.record_shadow(shadow)
    assert store.shadow_records() == shadows and store.shadow_records(stamps[2]) == shadows[1:]
    with pytest.raises(AuditError):  # a shadow answer belongs to an audited request, once
        store.record_shadow(shadows[0])
    with pytest.raises(AuditError):
        store.record_shadow(ShadowRecord("never-answered", stamps[2], "cand", "2", 0.5, "genuine"))


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_model_events_in_order_and_the_aliases_they_set(store: Any) -> None:
    day = "2026-12-0{}T10:00:00+00:00".format
    events = [
        ModelEvent(day(1), "promote", "photo-a", "production", "1", None, "cli:ops", "first"),
        ModelEvent(day(2), "promote", "photo-a", "production", "2", "1", "cli:ops", "better", '{"d": 0.01}'),
        ModelEvent(day(3), "promote", "xray-a", "production", "5", None, "cli:ops", "x"),
        ModelEvent(day(4), "rollback", "photo-a", "production", "1", "2", "cli:ops", "alarms"),
    ]
    for event in events:
        store.record_model_event(event)
    assert store.model_events() == events
    assert store.model_events("photo-a") == [events[0], events[1], events[3]]
    adopted = ModelEvent(day(5), "adopt", "photo-a", "production", "9", None, "verity serve", "start")
    assert not store.adopt_alias(adopted)  # photo-a has an alias already: nothing written
    fresh = ModelEvent(day(5), "adopt", "photo-b", "production", "3", None, "verity serve", "start")
    assert store.adopt_alias(fresh) and not store.adopt_alias(fresh)  # once, however often it is asked
    assert store.model_events("photo-b") == [fresh]
    aliases = current_aliases(store.model_events())
    assert {key: event.version for key, event in aliases.items()} == {
        ("photo-a", "production"): "1", ("xray-a", "production"): "5", ("photo-b", "production"): "3",
    }


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_change_counters_are_shared_by_every_opener(store: Any, database: str) -> None:
    assert store.generation("models") == 0
    assert [store.bump_generation("models") for _ in range(3)] == [1, 2, 3]
    other = open_audit_store(Settings(audit_db=database))  # as another worker opens it
    try:
        assert other.generation("models") == 3 and other.generation("keys") == 0
        assert other.bump_generation("models") == 4 and store.generation("models") == 4
    finally:
        other.close()


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_a_shared_request_bucket_holds_for_every_opener(store: Any, database: str) -> None:
    other = open_audit_store(Settings(audit_db=database))  # a second worker's connection
    try:
        waits = [(store if i % 2 else other).take_token("k1", 5.0, 5, 100.0) for i in range(6)]
        assert waits[:5] == [0.0] * 5 and waits[5] == pytest.approx(0.2)  # 5 at once, then 1 per 0.2 s
        assert store.take_token("k2", 5.0, 5, 100.0) == 0.0  # another key has its own bucket
        assert other.take_token("k1", 5.0, 5, 100.1) == pytest.approx(0.1)  # half a token refilled
        assert store.take_token("k1", 5.0, 5, 100.2) == 0.0
    finally:
        other.close()


@pytest.mark.parametrize("database", STORES, indirect=True)
def test_the_service_audits_and_confirms_on_either_store(tmp_path: Path, database: str) -> None:
    make_models_dir(tmp_path)
    settings = make_settings(tmp_path, audit_db=database)
    with TestClient(create_app(settings)) as client:
        answer = client.post("/v1/predict", files={"file": ("a.png", image_bytes(255), "image/png")},
                             data={"modality": "photo", "case_id": "SEZ-9"})  # fmt: skip
        assert answer.status_code == 200, answer.text
        request_id = answer.json()["request_id"]
        confirmation = {"request_id": request_id, "confirmed_label": "counterfeit"}
        feedback = client.post("/v1/feedback", json=confirmation)
        assert feedback.status_code == 200, feedback.text
        history = client.get("/v1/history").json()
        assert [item["request_id"] for item in history["items"]] == [request_id]
    store = open_audit_store(Settings(audit_db=database))
    try:
        audited = store.get(request_id)
        assert audited is not None and audited.case_id == "SEZ-9"
        assert audited.score == pytest.approx(answer.json()["score"], abs=1e-12)
        confirmed = store.feedback_for([request_id])[request_id]
        assert [row.confirmed_label for row in confirmed] == ["counterfeit"]
    finally:
        store.close()


# ------------------------------------------------------------------------------------ URLs that fail
def test_an_unknown_scheme_never_becomes_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VERITY_AUDIT_DB", "mysql://audit@127.0.0.1/verity")
    assert verity_main(["serve", "--port", "0"]) == 1
    assert "Unsupported audit database URL scheme 'mysql'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_no_server_stops_start_up_and_writes_nowhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    from postgres_fixtures import free_port

    require_postgres()
    monkeypatch.chdir(tmp_path)
    url = f"postgresql://verity:secret@127.0.0.1:{free_port()}/verity"
    monkeypatch.setenv("VERITY_AUDIT_DB", url)
    assert verity_main(["serve", "--port", "0"]) == 1
    error = capsys.readouterr().err
    assert "Cannot open the audit database postgresql://verity:***@127.0.0.1" in error
    assert "secret" not in error and "refused" in error.lower()
    assert list(tmp_path.iterdir()) == []  # the bug: a SQLite file named ./postgresql:/...


def test_wrong_credentials_and_missing_database_are_named(postgres: PostgresServer) -> None:
    with pytest.raises(AuditError, match="password authentication failed") as wrong:
        open_audit_store(Settings(audit_db=postgres.url(password="not-the-password")))
    assert "not-the-password" not in str(wrong.value)
    with pytest.raises(AuditError, match='database "no_such_db" does not exist'):
        open_audit_store(Settings(audit_db=postgres.url("no_such_db")))


def test_a_newer_schema_is_refused_and_workers_migrate_once(postgres: PostgresServer) -> None:
    import psycopg

    from verity.api.audit_postgres import SCHEMA_VERSION

    url = postgres.create_database("schema_check")
    stores = [open_audit_store(Settings(audit_db=url)) for _ in range(3)]  # as three workers start
    assert {store.schema_version() for store in stores} == {SCHEMA_VERSION}
    for store in stores:
        store.close()
    with psycopg.connect(url, autocommit=True) as connection:
        assert connection.execute("SELECT count(*) FROM verity_schema").fetchone()[0] == 1
        connection.execute("UPDATE verity_schema SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(AuditError, match="Upgrade Verity"):
        open_audit_store(Settings(audit_db=url))


# ------------------------------------------------------------------------------------------ migration
def test_migrate_copies_everything_and_proves_it(
    tmp_path: Path, postgres: PostgresServer, capsys: pytest.CaptureFixture
) -> None:
    source_path = tmp_path / "old.sqlite"
    source = open_audit_store(Settings(audit_db=source_path))
    stamps = times(30)
    source.record([record(f"r-{i:02d}", created=stamps[i], score=i / 29,
                          recognised=bool(i % 2) if i > 3 else None,
                          reasons="classifier" if i % 3 == 0 else None) for i in range(30)])  # fmt: skip
    source.add_feedback(FeedbackRecord("r-03", stamps[5], "counterfeit", notes="fake seal"),
                        [alert("a-1", "r-03", stamps[5])])  # fmt: skip
    source.finish_attempt(AlertDelivery("a-1", stamps[6], 1, 200, None, 4.0), "delivered", 1.0)
    event = ReferenceEvent(stamps[6], "add", "photo-a", "velmor-tea", "cd" * 32, "ref-1")
    source.record_reference_event(event)
    promoted = ModelEvent(stamps[7], "promote", "photo-a", "production", "2", "1", "cli:ops", "retrained")
    source.record_model_event(promoted)
    source.close()
    url = postgres.create_database("migrated")
    assert verity_main(["audit", "migrate", "--from", str(source_path), "--to", url]) == 0
    printed = capsys.readouterr().out
    assert "predictions: 30 rows" in printed and "feedback: 1 rows" in printed
    assert "model_events: 1 rows" in printed
    assert "alerts: 1 rows" in printed and "alert_deliveries: 1 rows" in printed
    assert verity_main(["audit", "migrate", "--from", str(source_path), "--to", url]) == 0  # again: same
    target = open_audit_store(Settings(audit_db=url))
    try:
        assert target.count() == 30
        assert target.model_events() == [promoted]
        assert target.get("r-05") == record("r-05", created=stamps[5], score=5 / 29, recognised=True)
        target.add_feedback(FeedbackRecord("r-04", stamps[7], "genuine"))  # ids continue past the copied
        assert [row.confirmed_label for row in target.feedback_for(["r-04"])["r-04"]] == ["genuine"]
    finally:
        target.close()
    with sqlite3.connect(source_path) as db:  # a row only the source has: the check must say so
        db.execute("UPDATE predictions SET score = 0.5 WHERE request_id = 'r-07'")
    assert verity_main(["audit", "migrate", "--from", str(source_path), "--to", url]) == 1
    assert "differs from the source in predictions" in capsys.readouterr().err
