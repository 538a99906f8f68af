"""A shadow model scores live traffic beside the one serving: its answers go to the audit log only, the
answers given are those without it, and `verity shadow report` shows where the two disagree."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from api_fixtures import image_bytes, make_models_dir, make_settings, write_model
from fastapi.testclient import TestClient

from verity import cli as verity_cli
from verity.api.app import create_app
from verity.api.audit import SQLiteAuditStore

REQUESTS = 100


def _answers(settings, images: list[bytes]) -> list[dict]:  # noqa: ANN001 - Settings
    with TestClient(create_app(settings)) as client:
        answers = []
        for index, image in enumerate(images):
            response = client.post("/v1/predict", files={"file": ("a.png", image)},
                                   data={"modality": "photo", "station_id": f"gate-{index % 3}"})  # fmt: skip
            assert response.status_code == 200, response.text
            answers.append(response.json())
        deadline = time.monotonic() + 30  # the shadow drains its queue after the answers
        store = SQLiteAuditStore(settings.audit_db)
        try:
            while settings.shadow and len(store.shadow_records()) < REQUESTS and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            store.close()
        metrics = client.get("/metrics").text
    return answers, metrics


def test_a_shadow_answers_into_the_audit_only(tmp_path: Path, monkeypatch, capsys) -> None:
    images = [image_bytes(int(value)) for value in (i * 255 / (REQUESTS - 1) for i in range(REQUESTS))]
    plain_root, shadow_root = tmp_path / "plain", tmp_path / "shadow"
    for root in (plain_root, shadow_root):
        make_models_dir(root)
        write_model(root / "models", "photo-cand", "1", alarm=0.95, clear=0.05)  # decides far less often
    plain, _ = _answers(make_settings(plain_root, rate_limit_per_s=0), images)
    settings = make_settings(shadow_root, rate_limit_per_s=0, shadow="photo-cand/1")
    shadowed, metrics = _answers(settings, images)
    for without, with_shadow in zip(plain, shadowed, strict=True):  # the answers given do not change
        assert (with_shadow["verdict"], with_shadow["score"], with_shadow["model"]) == (
            without["verdict"], without["score"], without["model"])
    store = SQLiteAuditStore(settings.audit_db)
    try:
        records = {record.request_id: record for record in store.shadow_records()}
    finally:
        store.close()
    assert set(records) == {answer["request_id"] for answer in shadowed}  # every answer, once
    assert {(r.model_name, r.model_version) for r in records.values()} == {("photo-cand", "1")}
    assert 'verity_shadow_total{outcome="scored"} 100.0' in metrics
    monkeypatch.setenv("VERITY_AUDIT_DB", str(settings.audit_db))
    assert verity_cli.main(["shadow", "report"]) == 0
    printed = capsys.readouterr().out
    assert "100 answers scored by photo-cand/1" in printed and "disagree" in printed
    # The same score with stricter thresholds: what production called genuine, the shadow leaves uncertain.
    assert "said genuine" in printed and "the shadow uncertain" in printed


def test_a_full_queue_drops_rather_than_waits(tmp_path: Path) -> None:
    import asyncio

    from prometheus_client import CollectorRegistry, Counter

    from verity.api.shadow import ShadowScorer

    outcomes = Counter("shadow_test_total", "test", ["outcome"], registry=CollectorRegistry())
    scorer = ShadowScorer("photo-cand/1", None, None, outcomes, queue_size=2)  # type: ignore[arg-type]
    for index in range(5):
        scorer.offer(f"r{index}", "photo", b"x")
    assert scorer.queue.qsize() == 2 and outcomes.labels("dropped")._value.get() == 3
    assert asyncio.iscoroutinefunction(scorer._drain)


def test_the_shadow_setting_is_checked(tmp_path: Path) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        make_settings(tmp_path, shadow="m" * 300)
