"""Dual energy end to end (issue 26): `verity train` with its defaults on synthetic dual-energy scans
(two-page 16-bit TIFFs) chooses a 2-channel model, exports it, and the server scores a parcel's pair in
each form consoles send it (two-page TIFF, two-frame DICOS, `high` and `low` files) alike to 1e-4,
saying it used both images. A single scan sent to that model is refused with what it needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient

from tests.test_dual_energy_api import parcels, three_forms
from verity import cli as verity_cli
from verity.api.app import create_app
from verity.datasets.synth import encode_png16

pytestmark = [pytest.mark.slow, pytest.mark.torch]


@pytest.fixture(scope="module")
def dual_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dual-train")
    data = root / "synth-dual"
    synth = ["data", "synth", "--modality", "xray", "--dual-energy", "--n", "48", "--size", "96"]
    synth += ["--seed", "5"]
    assert verity_cli.main([*synth, "--out", str(data)]) == 0
    models = root / "checkpoints"
    assert verity_cli.main([
        "train", "--data", str(data / "manifest.jsonl"), "--modality", "xray", "--image-size", "64",
        "--epochs", "1", "--max-steps", "3", "--batch-size", "8", "--workers", "0", "--no-progress",
        "--name", "xray-dual", "--version", "1", "--out", str(models), "--no-report", "--allow-weak",
    ]) == 0  # fmt: skip
    return models


def test_the_defaults_train_two_channels_on_dual_energy_scans(dual_models: Path) -> None:
    card = json.loads((dual_models / "xray-dual" / "1" / "card.json").read_text())
    assert card["spec"]["in_chans"] == 2 and card["modality"] == "xray"


def test_a_dual_energy_model_scores_the_three_forms_of_a_pair_alike(
    dual_models: Path, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, models_dir=dual_models, rate_limit_per_s=0, modalities=["xray"])
    with TestClient(create_app(settings)) as client:
        for pair in parcels(3):
            bodies = three_forms(client, pair)
            assert {body["dual_energy_used"] for body in bodies} == {"high and low"}
        single = client.post("/v1/predict", files={"file": ("one.png", encode_png16(pair[0]))})
    assert single.status_code in (400, 422), single.text
    assert "dual" in single.json()["error"]["message"].lower()
