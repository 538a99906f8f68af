"""Drift per station: answers held against the validation distribution of the model that gave them
(inference.drift, api/drift_monitor.py, `verity drift report`)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity import cli as verity_cli
from verity.api.app import create_app
from verity.datasets.manifest import ManifestRow, write_manifest
from verity.inference.drift import DRIFT_ALERT_PSI, MIN_WINDOW, decile_cuts, drift_figures, psi

pytestmark = pytest.mark.torch  # the gate is built by training's code (training/open_set.py)


def test_psi_is_small_for_the_same_distribution_and_large_for_a_shift() -> None:
    rng = np.random.default_rng(0)
    cuts = decile_cuts(rng.normal(0.5, 0.1, 2000))
    assert psi(rng.normal(0.5, 0.1, 500), cuts) < 0.1
    assert psi(rng.normal(0.3, 0.1, 500), cuts) > DRIFT_ALERT_PSI
    reference = {"score": cuts, "brightness": None, "not_recognised_rate": 0.01}
    few = drift_figures(reference, rng.normal(0.3, 0.1, MIN_WINDOW - 1), np.full(MIN_WINDOW - 1, np.nan),
                        np.zeros(MIN_WINDOW - 1, bool))  # fmt: skip
    assert few["score_psi"] is None and few["brightness_psi"] is None and not few["alert"]


def _png(level: float, rng: np.random.Generator) -> bytes:
    pixels = np.clip(rng.normal(level, 25, (32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def monitored_model(models: Path, data: Path, train: int = 50) -> Path:
    """A tiny photo model whose gate (and drift reference) training's code built from a set of mid-grey
    images (`train` training images, 30 validation images; cases of five), as `verity export` builds it."""
    from verity.training.open_set import build_open_set

    rng = np.random.default_rng(1)
    rows = []
    data.mkdir(parents=True)
    for index in range(train + 30):
        path = data / f"{index}.png"
        path.write_bytes(_png(rng.normal(140, 20), rng))
        split = "train" if index < train else "val"
        label, case = ("genuine" if index % 2 else "counterfeit"), f"case-{index // 10}-{index % 2}"
        rows.append(ManifestRow(str(path), label, "photo", case_id=case, split=split))  # 5 images a case
    write_manifest(data / "manifest.jsonl", rows)
    spec = tiny_spec("photo")
    model = tiny_onnx(models / "photo-m" / "1" / "model.onnx", spec, tiny_card(spec, "photo-m", "1"),
                      features=8, embedding=True)  # fmt: skip
    build_open_set(model, data / "manifest.jsonl")
    return model


def test_a_darker_stream_raises_the_alert_and_an_unshifted_one_does_not(tmp_path: Path, capsys,
                                                                        monkeypatch) -> None:  # fmt: skip
    settings = make_settings(tmp_path, rate_limit_per_s=0)  # one client sends every station's stream
    monitored_model(settings.models_dir, tmp_path / "data")
    rng = np.random.default_rng(7)
    with TestClient(create_app(settings)) as client:
        for station, level in (("gate-dark", 60.0), ("gate-ok", 140.0)):
            for _ in range(MIN_WINDOW + 20):
                image = _png(rng.normal(level, 20), rng)
                response = client.post("/v1/predict", files={"file": ("a.png", image)},
                                       data={"modality": "photo", "station_id": station})  # fmt: skip
                assert response.status_code == 200, response.text
        metrics = client.get("/metrics").text
    assert 'verity_drift_alert{modality="photo",station="gate-dark"} 1.0' in metrics
    assert 'verity_drift_alert{modality="photo",station="gate-ok"} 0.0' in metrics
    brightness = [line for line in metrics.splitlines() if line.startswith("verity_drift_psi{")
                  and 'signal="brightness"' in line and "gate-dark" in line]  # fmt: skip
    assert brightness and float(brightness[0].split()[-1]) > DRIFT_ALERT_PSI
    monkeypatch.setenv("VERITY_MODELS_DIR", str(settings.models_dir))
    monkeypatch.setenv("VERITY_AUDIT_DB", str(settings.audit_db))
    assert verity_cli.main(["drift", "report"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "score PSI" in lines["gate-ok"] and "ALERT" not in lines["gate-ok"]
    assert lines["gate-dark"].endswith("ALERT") and "120 answers" in lines["gate-dark"]
