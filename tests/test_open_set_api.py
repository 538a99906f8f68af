"""Open-set answers through the service: recognised, novelty and reasons on /v1 and /v2, product= with
its reference check, 404 for an unknown product, the audit row, `verity predict --product` and
`verity eval --references --ood`."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_fixtures import admin_headers, assert_error, make_settings
from fastapi.testclient import TestClient
from PIL import Image
from test_open_set import gated_model

from verity.inference.engine import OnnxEngine
from verity.inference.references.check import embed_image
from verity.inference.references.store import ReferenceStore

PRODUCT = "acme-tea"


def png(seed: int | None = None, value: int | None = None, size: int = 32) -> bytes:
    """Noise (the gated model's training texture) or a flat image (unlike it)."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8) if value is None else np.full(
        (size, size, 3), value, np.uint8
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[TestClient, Path]]:
    """The gated tiny photo model served alone, with 6 references of PRODUCT enrolled."""
    model = gated_model(tmp_path / "build")
    target = tmp_path / "models" / "tiny-photo" / "1"
    target.mkdir(parents=True)
    for name in ("model.onnx", "bank.npz"):
        (target / name).write_bytes((model.parent / name).read_bytes())
    settings = make_settings(tmp_path, references_dir=tmp_path / "references", rate_limit_per_s=0)
    engine = OnnxEngine(target / "model.onnx", warmup=False)
    store = ReferenceStore(settings.references_dir)
    for seed in range(200, 206):
        store.add(engine.name, PRODUCT, png(seed), source=f"{seed}.png", actor="test", role="admin",
                  embed=lambda data: embed_image(engine, data))
    from verity.api.app import create_app

    with TestClient(create_app(settings)) as client:
        yield client, tmp_path


def test_every_answer_says_recognised_novelty_and_reasons(served: tuple[TestClient, Path]) -> None:
    client, root = served
    seen = client.post("/v1/predict", data={"modality": "photo"}, files={"file": png(7)}).json()
    flat = client.post("/v1/predict", data={"modality": "photo"}, files={"file": png(value=255)}).json()
    assert seen["recognised"] is True and seen["novelty"] >= 0 and seen["reference"] is None
    assert (flat["recognised"], flat["verdict"]) == (False, "uncertain")
    assert flat["reasons"] == ["not_recognised", "unlike_training"]
    rows = dict(sqlite3.connect(root / "audit.sqlite").execute(
        "SELECT request_id, reasons FROM predictions WHERE recognised = 0"
    ).fetchall())
    assert rows == {flat["request_id"]: "not_recognised,unlike_training"}


def test_an_image_under_the_training_envelope_is_not_recognised_and_audited(tmp_path: Path) -> None:
    """The served answer applies the training envelope: noise of the bank's texture, 31 px tall under
    a model whose smallest training image was 32 px, is uncertain and not recognised; 32 px is not."""
    model = gated_model(tmp_path / "build", min_side=32)
    target = tmp_path / "models" / "tiny-photo" / "1"
    target.mkdir(parents=True)
    for name in ("model.onnx", "bank.npz"):
        (target / name).write_bytes((model.parent / name).read_bytes())
    from verity.api.app import create_app

    settings = make_settings(tmp_path, rate_limit_per_s=0)
    with TestClient(create_app(settings)) as client:
        def answer(height: int) -> dict[str, Any]:
            image = Image.fromarray(np.random.default_rng(9).integers(0, 256, (height, 32, 3), np.uint8))
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            files = {"file": buffer.getvalue()}
            response = client.post("/v1/predict", data={"modality": "photo"}, files=files)
            assert response.status_code == 200, response.text
            return response.json()

        small, full = answer(31), answer(32)
    assert (small["recognised"], small["verdict"]) == (False, "uncertain")
    assert small["reasons"] == ["not_recognised", "smaller_than_training"]
    gate = OnnxEngine(model, warmup=False).novelty_gate
    assert full["recognised"] is True and gate is not None and small["novelty"] <= gate.threshold
    rows = dict(sqlite3.connect(tmp_path / "audit.sqlite").execute(
        "SELECT request_id, recognised FROM predictions"
    ).fetchall())
    assert rows == {small["request_id"]: 0, full["request_id"]: 1}


def test_a_named_product_is_checked_against_its_references(served: tuple[TestClient, Path]) -> None:
    client, root = served
    answer = client.post(
        "/v1/predict", data={"modality": "photo", "product": PRODUCT}, files={"file": png(8)}
    ).json()
    reference = answer["reference"]
    assert reference["product"] == PRODUCT
    assert reference["references"] == 6 and reference["min_references"] == 5
    assert reference["status"] in ("match", "mismatch") and reference["threshold"] is not None
    assert ("reference_mismatch" in answer["reasons"]) == (reference["status"] == "mismatch")
    row = sqlite3.connect(root / "audit.sqlite").execute(
        "SELECT product, reference_status, reference_count FROM predictions WHERE request_id = ?",
        (answer["request_id"],),
    ).fetchone()
    assert row == (PRODUCT, reference["status"], 6)


def test_an_unknown_product_is_404_naming_the_enrolled_ones(served: tuple[TestClient, Path]) -> None:
    client, root = served

    def ask(product: str) -> Any:
        fields = {"modality": "photo", "product": product}
        return client.post("/v1/predict", data=fields, files={"file": png(1)})

    assert PRODUCT in assert_error(ask("nope"), 404, "unknown_product")["error"]["message"]
    assert_error(ask("Bad Name!"), 422)
    audited = sqlite3.connect(root / "audit.sqlite").execute("SELECT COUNT(*) FROM predictions").fetchone()
    assert audited == (0,)


def test_too_few_references_abstain_and_say_so(served: tuple[TestClient, Path]) -> None:
    client, root = served
    settings_headers = admin_headers(make_settings(root))
    listing = client.get(f"/v1/references?modality=photo&product={PRODUCT}", headers=settings_headers).json()
    for reference in listing["references"][:2]:
        client.delete(f"/v1/references/{reference['reference_id']}?modality=photo", headers=settings_headers)
    answer = client.post(
        "/v1/predict", data={"modality": "photo", "product": PRODUCT}, files={"file": png(9)}
    ).json()
    assert answer["reference"]["status"] == "abstained" and answer["reference"]["references"] == 4
    assert "reference_mismatch" not in answer["reasons"]


def test_v2_carries_the_open_set_outputs_and_the_product(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    request = {
        "inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [2],
                    "data": [base64.b64encode(png(3)).decode(), base64.b64encode(png(value=0)).decode()],
                    "parameters": {"content_type": "base64"}}],
        "parameters": {"product": PRODUCT},
    }
    response = client.post("/v2/models/tiny-photo/infer", json=request)
    assert response.status_code == 200, response.text
    outputs = {o["name"]: o for o in response.json()["outputs"]}
    assert outputs["recognised"]["datatype"] == "BOOL" and outputs["recognised"]["data"][1] is False
    assert outputs["reasons"]["data"][1] == "not_recognised,unlike_training"
    assert len(outputs["novelty"]["data"]) == 2
    metadata = client.get("/v2/models/tiny-photo").json()
    assert {"recognised", "novelty", "reasons"} <= {o["name"] for o in metadata["outputs"]}
    unknown = dict(request, parameters={"product": "nope"})
    assert client.post("/v2/models/tiny-photo/infer", json=unknown).status_code == 404


def test_predict_cli_checks_a_product(
    served: tuple[TestClient, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from verity.inference.cli import main

    _, root = served
    image = root / "item.png"
    image.write_bytes(png(11))
    model = root / "models" / "tiny-photo"
    assert main(["--model", str(model), str(image), "--json", "--product", PRODUCT,
                 "--references", str(root / "references")]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["recognised"] is True and result["reference"]["product"] == PRODUCT
    assert main(["--model", str(model), str(image), "--product", "nope",
                 "--references", str(root / "references")]) == 1
    assert PRODUCT in capsys.readouterr().err


@pytest.mark.torch
def test_eval_reports_the_unseen_and_the_ood_folder(served: tuple[TestClient, Path]) -> None:
    from verity.training.evaluate import evaluate

    _, root = served
    data, ood = root / "eval", root / "ood"
    for label, seeds in (("genuine", range(300, 312)), ("counterfeit", range(400, 412))):
        folder = data / label / PRODUCT
        folder.mkdir(parents=True)
        for seed in seeds:  # counterfeits: brighter noise, which the tiny model scores higher
            pixels = np.random.default_rng(seed).integers(0 if label == "genuine" else 90, 256, (32, 32, 3))
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{seed}.png")
    (ood / "flat").mkdir(parents=True)
    for value in (0, 128, 255):
        (ood / "flat" / f"{value}.png").write_bytes(png(value=value))
    result = evaluate(root / "models" / "tiny-photo", data, split="all", out_dir=root / "out",
                      progress=False, report=False, references=root / "references", ood=ood)
    assert result["open_set"]["ood"]["not_recognised_rate"] == 1.0
    assert result["open_set"]["ood"]["images"] == 3
    assert 0.0 <= result["open_set"]["evaluated"]["not_recognised_rate"] <= 1.0
    scorers = result["unseen"]["recall_at_false_alarm_rate"]["0.01"]
    assert set(scorers) == {"classifier", "reference", "fused"}
    assert result["unseen"]["images"]["checked"] == 24
    assert 0.0 <= result["unseen"]["served_rule"]["false_alarm_rate"] <= 1.0
