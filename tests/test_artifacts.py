"""inference.artifacts: one version order and one model resolution for predict, eval and the server."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pytest
from api_fixtures import make_settings, write_model
from PIL import Image

from verity.cli import main as verity_main
from verity.inference.artifacts import MODEL_FILES, ONNX_FILES, resolve_model, version_sort_key

if TYPE_CHECKING:
    from verity.api.settings import Settings


def _newest(versions: list[str]) -> list[str]:
    return sorted(versions, key=version_sort_key)


def test_versions_sort_in_natural_order_not_lexicographic() -> None:
    assert _newest(["1.10.0", "1.9.0", "1.2.0"]) == ["1.2.0", "1.9.0", "1.10.0"]
    assert _newest(["10", "9", "1"]) == ["1", "9", "10"]
    assert _newest(["v10", "v9"]) == ["v9", "v10"]
    # Dates with or without separators, as `verity train --version` is often given them.
    assert _newest(["2026.11.10", "2026.11.2", "2025.12.31"]) == ["2025.12.31", "2026.11.2", "2026.11.10"]
    assert _newest(["2026-01-12", "2026-01-05"]) == ["2026-01-05", "2026-01-12"]
    # Non-numeric parts compare as text; a number sorts before text in the same place.
    assert _newest(["dev", "10", "2"]) == ["2", "10", "dev"]
    assert _newest(["1.0rc1", "1.0", "1.0b2"]) == ["1.0", "1.0b2", "1.0rc1"]


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_resolve_model_takes_each_layout_train_writes(tmp_path: Path) -> None:
    models = tmp_path / "checkpoints"
    for version in ("9", "10"):
        _touch(models / "photo" / version / "model.onnx")
        _touch(models / "photo" / version / "model.pt")
    _touch(models / "photo" / "11" / "model.pt")  # a checkpoint not exported yet
    ten = models / "photo" / "10" / "model.onnx"

    # Predict serves ONNX only: version 11 has none, so 10 is the newest it can run.
    assert resolve_model(models / "photo", ONNX_FILES) == ten
    assert resolve_model(models, ONNX_FILES) == ten  # a folder holding one model
    assert resolve_model(models / "photo" / "9", ONNX_FILES) == models / "photo" / "9" / "model.onnx"
    assert resolve_model(ten, ONNX_FILES) == ten
    # Evaluation takes a checkpoint too, the ONNX export first where a version has both.
    assert resolve_model(models / "photo", MODEL_FILES) == models / "photo" / "11" / "model.pt"
    assert resolve_model(models / "photo" / "10", MODEL_FILES) == ten

    with pytest.raises(ValueError, match=r"model.pt is not an ONNX model \(.onnx\)"):
        resolve_model(models / "photo" / "11" / "model.pt", ONNX_FILES)
    with pytest.raises(FileNotFoundError, match="holds no model.onnx, nor <version>/"):
        resolve_model(models / "photo" / "11", ONNX_FILES)
    with pytest.raises(FileNotFoundError, match="No model at"):
        resolve_model(tmp_path / "missing", ONNX_FILES)
    _touch(models / "xray" / "1" / "model.onnx")
    with pytest.raises(ValueError, match=r"holds 2 models \(photo, xray\); choose one"):
        resolve_model(models, ONNX_FILES)


def test_predict_and_the_server_pick_version_10_over_9(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`verity predict --model checkpoints/X` and the server's default agree: 10 is newer than 9."""
    models = tmp_path / "models"
    for version in ("9", "10"):
        write_model(models, "photo-test", version)
    image = tmp_path / "grey.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)

    picked = []
    for model in (models / "photo-test", models):
        assert verity_main(["predict", "--model", str(model), str(image), "--json"]) == 0
        picked.append(json.loads(capsys.readouterr().out)["model"]["version"])

    assert picked == ["10", "10"]
    assert asyncio.run(_served_versions(make_settings(tmp_path))) == ("10", "10")


async def _served_versions(settings: Settings) -> tuple[str, str]:
    """(the photo default's version, the version `find` gives for photo-test) once the registry loaded."""
    from verity.api.registry import ModelRegistry

    registry = ModelRegistry(settings)
    await registry.reload()
    try:
        served, found = registry.default_for("photo"), registry.find("photo-test")
        assert served is not None and found is not None
        return served.engine.version, found.engine.version
    finally:
        await registry.close()
