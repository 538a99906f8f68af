"""The shipped default models: what `make serve` serves on a fresh clone.

They must load through the real app with the default settings' models folder, stay within the size
budget, carry the held-out figures they were promoted on, and still tell genuine from counterfeit on
synthetic images they never saw (a fresh seed), scored through the HTTP API as a station would.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import verity_cli
from training.metrics import roc_auc

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = {modality: ROOT / "checkpoints" / f"{modality}-default" / "1.0.0" for modality in ("photo", "xray")}
MAX_ONNX_BYTES = 20 * 1024 * 1024


@pytest.mark.parametrize("modality", sorted(SHIPPED))
def test_shipped_model_files_and_card(modality: str) -> None:
    run = SHIPPED[modality]
    onnx_file = run / "model.onnx"
    assert onnx_file.is_file() and (run / "model.pt").is_file()
    assert onnx_file.stat().st_size <= MAX_ONNX_BYTES
    card = json.loads((run / "card.json").read_text())
    assert card["modality"] == modality
    assert card["metrics"]["test"]["roc_auc"] >= 0.95
    assert 0.0 < card["thresholds"]["clear"] <= card["thresholds"]["alarm"] < 1.0
    int8 = card.get("int8")
    # An INT8 variant is shipped exactly when it passed its accuracy gate, and the card says so.
    assert (run / "model.int8.onnx").is_file() == bool(int8 and int8["written"])
    if int8 and int8["written"]:
        assert int8["passed"] and int8["auc_drop"] <= 0.005 and int8["verdict_agreement"] >= 0.99
        assert (run / "model.int8.onnx").stat().st_size <= MAX_ONNX_BYTES / 3


@pytest.mark.parametrize("modality", sorted(SHIPPED))
def test_shipped_model_separates_unseen_synthetic_images(modality: str, tmp_path: Path) -> None:
    from api.app import create_app
    from api.settings import Settings

    data = tmp_path / "fresh"
    assert verity_cli.main(
        ["data", "synth", "--modality", modality, "--n", "160", "--difficulty", "easy", "--seed", "101",
         "--out", str(data)]
    ) == 0
    rows = [json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines()]
    settings = Settings(
        models_dir=ROOT / "checkpoints", audit_db=tmp_path / "audit.sqlite", keys_file=tmp_path / "keys.json",
        background_load=False,
    )
    scores: list[float] = []
    targets: list[int] = []
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        served = next(m for m in client.get("/v1/models").json()["models"] if m["modality"] == modality)
        expected = "int8" if (SHIPPED[modality] / "model.int8.onnx").is_file() else "fp32"
        assert served["precision"] == expected and served["provider"] == "CPUExecutionProvider"
        for row in rows:
            path = data / row["path"]
            response = client.post(
                "/v1/predict", files={"file": (path.name, path.read_bytes())}, data={"modality": modality}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["model"] == {"name": f"{modality}-default", "version": "1.0.0"}
            scores.append(body["score"])
            targets.append(int(row["label"] == "counterfeit"))
    assert 60 <= sum(targets) <= len(targets) - 60
    auc = roc_auc(scores, targets)
    assert auc is not None and auc >= 0.85
