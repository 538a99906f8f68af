"""A model the weak-run guard refused, kept with --allow-weak, never goes live by itself: the newest folder
does not become a modality's default when its card marks it weak; the reload says so, /v1/models shows
the mark, and only VERITY_PINNED_MODELS serves it."""

from __future__ import annotations

from pathlib import Path

from api_fixtures import IMAGE_SIZE, admin_headers, make_models_dir, make_settings
from fastapi.testclient import TestClient

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.api.app import create_app
from verity.inference.card import WEAK_RUN, ModelCard
from verity.training.guard import check_run


def write_weak_model(models_dir: Path, name: str, version: str) -> Path:
    spec = tiny_spec("photo", IMAGE_SIZE)
    warnings = check_run(["validation ROC AUC 0.475 is no better than chance"], [], allow_weak=True)
    card = {**tiny_card(spec, name, version), "warnings": warnings}
    return tiny_onnx(models_dir / name / version / "model.onnx", spec, card)


def test_the_guard_marks_the_card_weak() -> None:
    warnings = check_run(["shuffled"], ["a note"], allow_weak=True)
    assert warnings[0].startswith(WEAK_RUN)
    card = ModelCard.from_dict({**tiny_card(tiny_spec("photo")), "warnings": warnings})
    assert card.weak and not ModelCard.from_dict(tiny_card(tiny_spec("photo"))).weak


def test_a_newer_weak_model_is_passed_over_until_pinned(tmp_path: Path) -> None:
    make_models_dir(tmp_path)
    settings = make_settings(tmp_path)
    write_weak_model(settings.models_dir, "photo-test", "9")  # newer than photo-test/2, there at the start
    with TestClient(create_app(settings)) as client:
        report = client.app.state.registry.last_report
        assert report.passed_over == ["photo-test/9"] and "photo-test/9" in report.loaded
        assert client.get("/readyz").json()["defaults"]["photo"] == "photo-test/2"  # and it became production
        listed = {(m["name"], m["version"]): m for m in client.get("/v1/models").json()["models"]}
        assert listed[("photo-test", "9")]["weak"] and not listed[("photo-test", "9")]["default"]
        assert listed[("photo-test", "2")]["aliases"] == ["production"]
        reload = client.post("/v1/models/reload", headers=admin_headers(settings)).json()
        assert reload["defaults"]["photo"] == "photo-test/2"
    make_models_dir(tmp_path / "pinned")
    pinned = make_settings(tmp_path / "pinned", pinned_models={"photo": "photo-test/9"})
    write_weak_model(pinned.models_dir, "photo-test", "9")
    with TestClient(create_app(pinned)) as client:
        assert client.get("/readyz").json()["defaults"]["photo"] == "photo-test/9"  # the operator's choice


def test_a_modality_with_only_weak_models_has_no_default(tmp_path: Path) -> None:
    make_models_dir(tmp_path)
    settings = make_settings(tmp_path)
    for version in ("1", "2"):
        (settings.models_dir / "photo-test" / version / "model.onnx").unlink()
    write_weak_model(settings.models_dir, "photo-test", "3")
    with TestClient(create_app(settings)) as client:
        response = client.post("/v1/predict", files={"file": ("a.png", b"x")}, data={"modality": "photo"})
        assert response.status_code == 503 and "photo" in response.json()["error"]["message"]
        assert "photo" not in client.get("/readyz").json()["defaults"]


def test_pins_read_as_pairs_or_json_and_bad_ones_are_named(monkeypatch) -> None:
    import pytest
    from pydantic import ValidationError

    from verity.api.settings import Settings

    for text in ("photo=photo-test/9, xray=xray-test", '{"photo": "photo-test/9", "xray": "xray-test"}'):
        monkeypatch.setenv("VERITY_PINNED_MODELS", text)
        assert Settings().pinned_models == {"photo": "photo-test/9", "xray": "xray-test"}
    for text, named in (("photo-default", "modality=name"), ("sonar=x", "unknown modality sonar")):
        monkeypatch.setenv("VERITY_PINNED_MODELS", text)
        with pytest.raises(ValidationError, match=named):
            Settings()


def test_verity_serve_refuses_a_bad_pin_with_a_message(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "VERITY_PINNED_MODELS": "photo-default", "VERITY_AUDIT_DB": str(tmp_path / "a.db")}
    done = subprocess.run([sys.executable, "-m", "verity", "serve", "--port", "1"], env=env,
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "VERITY_PINNED_MODELS: expected modality=name[/version] pairs, got photo-default" in done.stderr


def test_readyz_is_not_ready_while_a_served_modality_has_no_model(tmp_path: Path) -> None:
    make_models_dir(tmp_path)
    (tmp_path / "models" / "xray-test" / "1" / "model.onnx").unlink()
    with TestClient(create_app(make_settings(tmp_path))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "No model for xray" in ready.json()["message"]
        assert "VERITY_MODALITIES" in ready.json()["message"]
        assert client.get("/v2/health/ready").status_code == 503
    with TestClient(create_app(make_settings(tmp_path, modalities=["photo"]))) as client:  # a photo-only post
        assert client.get("/readyz").status_code == 200
