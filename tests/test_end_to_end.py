"""The whole path on a fresh, tiny scale: synthetic data -> training -> ONNX export -> served verdict.

Each stage runs through its real entry point (the `verity` subcommands and the app factory), so this
test fails if any contract between the stages breaks: manifest format, checkpoint layout, the spec
and card in the ONNX metadata, or the response schema.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from verity import cli as verity_cli

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def trained_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Generates a tiny photo set, trains a few steps at 64 px and exports into a models folder."""
    root = tmp_path_factory.mktemp("e2e")
    data = root / "synth-photo"
    assert verity_cli.main(
        ["data", "synth", "--modality", "photo", "--n", "48", "--size", "96", "--seed", "3",
         "--out", str(data)]
    ) == 0
    assert (data / "manifest.jsonl").is_file()
    models = root / "checkpoints"
    assert verity_cli.main(
        [
            "train", "--data", str(data / "manifest.jsonl"), "--modality", "photo", "--image-size", "64",
            "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--workers", "0", "--no-progress",
            "--name", "photo-e2e", "--version", "1", "--out", str(models), "--no-report", "--allow-weak",
        ]
    ) == 0
    return models


def test_training_writes_the_three_artifacts(trained_models: Path) -> None:
    run = trained_models / "photo-e2e" / "1"
    for name in ("model.pt", "model.onnx", "card.json"):
        assert (run / name).is_file(), name
    card = json.loads((run / "card.json").read_text())
    assert card["modality"] == "photo" and card["spec"]["image_size"] == 64
    assert 0.0 <= card["thresholds"]["clear"] <= card["thresholds"]["alarm"] <= 1.0
    assert card["calibration"]["temperature"] > 0
    # The open-set gate, built at export: the bank beside the model, the threshold chosen on val, and
    # the training envelope (96 px images: capped at the 64 px input).
    novelty = card["novelty"]
    assert (run / novelty["bank_file"]).is_file() and novelty["bank_rows"] > 0
    assert novelty["min_side"] == 64 and 0.0 <= novelty["val_rate"] <= 1.0
    # The input profiles beside it, and the training images' colour: the generator's labels are colour.
    assert (run / novelty["profile"]["file"]).is_file() and novelty["profile"]["rows"] > 0
    assert novelty["colour_share"] == 1.0


def test_a_grey_scan_sent_to_the_colour_photo_model_is_another_modality(trained_models: Path) -> None:
    from verity.inference.engine import OnnxEngine
    from verity.inference.pipeline import score_bytes

    engine = OnnxEngine(trained_models / "photo-e2e" / "1" / "model.onnx", warmup=False)
    grey = io.BytesIO()
    Image.linear_gradient("L").resize((96, 96)).save(grey, "PNG")
    scored = score_bytes(grey.getvalue(), engine)
    assert (scored.verdict, scored.reasons) == ("uncertain", ("not_recognised", "other_modality"))
    assert scored.upload.decoded.colour is False


def test_checkpoint_reads_without_unpickling_objects(trained_models: Path) -> None:
    import torch

    checkpoint = torch.load(trained_models / "photo-e2e" / "1" / "model.pt", weights_only=True)
    assert checkpoint["spec"]["modality"] == "photo"


def test_served_verdict_from_the_trained_model(trained_models: Path, tmp_path: Path) -> None:
    from verity.api.app import create_app
    from verity.api.settings import Settings

    settings = Settings(
        models_dir=trained_models, audit_db=tmp_path / "audit.sqlite", keys_file=tmp_path / "keys.json",
        background_load=False, allowed_hosts=["testserver"], modalities=["photo"],  # a photo-only post
    )
    image = io.BytesIO()
    Image.new("RGB", (120, 90), (200, 30, 40)).save(image, "JPEG")
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        response = client.post(
            "/v1/predict", files={"file": ("label.jpg", image.getvalue(), "image/jpeg")},
            data={"modality": "photo"},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["verdict"] in ("genuine", "counterfeit", "uncertain")
        assert 0.0 <= body["score"] <= 1.0
        assert body["model"] == {"name": "photo-e2e", "version": "1"}
        assert body["modality"] == "photo" and body["request_id"] and body["latency_ms"] >= 0

        not_an_image = client.post(
            "/v1/predict", files={"file": ("x.jpg", b"hello, not an image", "image/jpeg")},
            data={"modality": "photo"},
        )
        assert 400 <= not_an_image.status_code < 500
        assert "error" in not_an_image.json()
        assert client.get("/healthz").status_code == 200


def test_eval_cli_prints_roc_auc(trained_models: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = trained_models.parent / "synth-photo" / "manifest.jsonl"
    model = trained_models / "photo-e2e" / "1" / "model.onnx"
    assert verity_cli.main(["eval", "--model", str(model), "--data", str(data), "--split", "test",
                            "--out", str(tmp_path / "eval")]) == 0
    assert "ROC AUC" in capsys.readouterr().out
