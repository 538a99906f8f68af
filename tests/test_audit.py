"""The audit store, image store, and the feedback loop from an answered prediction to a manifest."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest
from api_fixtures import image_bytes
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.audit import (
    AuditError,
    AuditRecord,
    FeedbackRecord,
    SQLiteAuditStore,
    open_audit_store,
)
from verity.api.feedback import resolve
from verity.api.image_store import ImageStore
from verity.api.settings import Settings
from verity.cli import main as verity_main
from verity.datasets.manifest import read_manifest, resolve_image_path


def record(request_id: str, created: str = "2026-11-29T10:00:00.000000+00:00", **overrides) -> AuditRecord:
    values = dict(
        request_id=request_id,
        created=created,
        station_id="gate-1",
        case_id="SEZ-1",
        image_sha256="ab" * 32,
        modality="photo",
        model_name="photo-test",
        model_version="2",
        score=0.9,
        verdict="counterfeit",
        alarm_threshold=0.6,
        clear_threshold=0.4,
        latency_ms=12.0,
    )
    values.update(overrides)
    return AuditRecord(**values)


def test_sqlite_store_is_wal_and_round_trips(tmp_path: Path) -> None:
    store = SQLiteAuditStore(tmp_path / "a.sqlite")
    store.record([record("r1"), record("r2", created="2026-11-29T11:00:00.000000+00:00")])
    assert store.get("r1") == record("r1") and store.get("missing") is None
    with sqlite3.connect(tmp_path / "a.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert [r.request_id for r in store.since("2026-11-29T10:30:00")] == ["r2"]
    assert [r.request_id for r in store.since(None)] == ["r1", "r2"]
    assert store.count() == 2
    store.close()


def test_a_failed_batch_write_writes_nothing(tmp_path: Path) -> None:
    store = SQLiteAuditStore(tmp_path / "a.sqlite")
    store.record([record("r1")])
    with pytest.raises(AuditError, match="could not be written"):
        store.record([record("r2"), record("r1")])  # r1 again: the whole batch is refused
    assert store.get("r2") is None and store.count() == 1


def test_confirmed_cases_latest_feedback_wins(tmp_path: Path) -> None:
    store = SQLiteAuditStore(tmp_path / "a.sqlite")
    store.record([record("r1"), record("r2")])
    gate = dict(station_id="gate-1", key_id="k1", role="station")  # the verdict's own station
    store.add_feedback(FeedbackRecord("r1", "2026-11-29T12:00:00+00:00", "genuine", **gate))
    store.add_feedback(
        FeedbackRecord("r1", "2026-11-29T13:00:00+00:00", "counterfeit", notes="lab confirmed", **gate)
    )
    cases = list(store.confirmed_cases())
    assert len(cases) == 1 and cases[0][0].request_id == "r1"
    assert [row.confirmed_label for row in cases[0][1]] == ["genuine", "counterfeit"]  # oldest first
    case, ignored = resolve(*cases[0])
    assert case is not None and ignored == 0 and case.resolution == "latest"
    assert case.winner.confirmed_label == "counterfeit" and case.winner.notes == "lab confirmed"


def test_open_store_by_url(tmp_path: Path) -> None:
    store = open_audit_store(Settings(audit_db=f"sqlite:///{tmp_path / 'u.sqlite'}"))
    assert isinstance(store, SQLiteAuditStore) and (tmp_path / "u.sqlite").exists()
    store.close()
    plain = open_audit_store(Settings(audit_db=tmp_path / "p.sqlite"))
    assert isinstance(plain, SQLiteAuditStore) and (tmp_path / "p.sqlite").exists()
    plain.close()
    with pytest.raises(AuditError, match="Unsupported audit database URL scheme 'mysql'"):
        open_audit_store(Settings(audit_db="mysql://audit@db/verity"))
    with pytest.raises(AuditError, match="Cannot open"):
        SQLiteAuditStore(tmp_path / "a-directory-not-a-file" / "..")


def test_image_store_is_content_addressed(tmp_path: Path) -> None:
    data = image_bytes(7)
    sha = hashlib.sha256(data).hexdigest()
    store = ImageStore(tmp_path / "images")
    path = store.put(data, sha, "png")
    assert path == store.put(data, sha, "png") and Path(path).name == f"{sha}.png"
    assert Path(path).parent.name == sha[:2] and Path(path).read_bytes() == data


def test_confirmed_cases_round_trip_through_ingest_into_a_manifest(
    tmp_path: Path, settings: Settings
) -> None:
    uploads = {"dark": image_bytes(0), "bright": image_bytes(255), "grey": image_bytes(190)}
    with TestClient(create_app(settings)) as client:
        ids = {}
        for name, data in uploads.items():
            response = client.post(
                "/v1/predict",
                data={"modality": "photo", "case_id": f"SEZ-{name}"},
                files={"file": (f"{name}.png", data)},
            )
            ids[name] = response.json()["request_id"]
        confirmed = {"dark": "genuine", "bright": "counterfeit"}  # grey: no feedback yet
        for name, label in confirmed.items():
            response = client.post("/v1/feedback", json={"request_id": ids[name], "confirmed_label": label})
            assert response.status_code == 200
    # As a user runs it: the service writes the confirmed cases, the data tools ingest them.
    out = tmp_path / "confirmed"
    assert verity_main(["audit", "confirmed", "--out", str(out), "--db", str(settings.audit_db)]) == 0
    manifest = tmp_path / "manifest.jsonl"
    ingest_argv = [str(out / "confirmed.jsonl"), "--out", str(manifest), "--no-progress"]
    assert verity_main(["data", "ingest", *ingest_argv]) == 0
    rows = list(read_manifest(manifest))
    assert sorted((row.label, row.case_id) for row in rows) == [
        ("counterfeit", "SEZ-bright"),
        ("genuine", "SEZ-dark"),
    ]
    for row in rows:
        image = resolve_image_path(manifest, row).read_bytes()
        assert hashlib.sha256(image).hexdigest() == row.sha256 == row.meta["image_sha256"]
        assert row.source == "feedback" and row.meta["request_id"] in ids.values()
        assert row.modality == "photo" and row.split in ("train", "val", "test")
    assert verity_main(["audit", "confirmed", "--out", str(out), "--db", str(tmp_path / "none.sqlite")]) == 1
