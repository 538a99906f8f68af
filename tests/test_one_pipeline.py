"""One scoring pipeline: `verity predict`, /v1/predict, /v1/predict/batch, /v2 infer and `verity eval`
give every image the same score (to 1e-4), verdict, `recognised` and `reasons`, with the novelty gate,
the training envelope and a product's reference check all in play: a 4000x1500 scan scored in tiles, an
image under the envelope's `min_side`, images scored whole, every one checked against a product with
enrolled genuine references.

The model is the tiny 160 px X-ray model with an embedding output and a novelty gate whose bank holds
noise images; the gate's `min_side` is 64 px.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient
from PIL import Image
from test_one_tiling_rule import _encode, _scene

from benchmarks.models import tiny_card, tiny_onnx
from verity.api.app import create_app
from verity.inference.bank import build_bank, save_bank
from verity.inference.engine import OnnxEngine
from verity.inference.gate_record import choose_novelty_threshold, novelty_record
from verity.inference.open_set import NoveltyGate
from verity.inference.references.store import ReferenceStore
from verity.inference.spec import resolve_spec
from verity.inference.tiling import TilingOptions, load_for_scoring
from verity.training.eval_cli import main as eval_main

SIZE = 160  # the shipped models' input: a 4000x1500 scan is tiled, a 640x480 image scored whole
MIN_SIDE = 64
PRODUCT = "acme"
TOLERANCE = 1e-4


def _noise(seed: int, height: int = 200, width: int = 200) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _gated_model(root: Path) -> Path:
    """The tiny X-ray model with a bank of noise images and a gate set on other noise images."""
    spec = resolve_spec("xray", override={"image_size": SIZE})
    card = tiny_card(spec, alarm=0.7, clear=0.3)
    path = root / "models" / card["name"] / card["version"] / "model.onnx"
    tiny_onnx(path, spec, card, features=8, embedding=True)
    engine = OnnxEngine(path, warmup=False)

    def embeddings(seeds: range) -> np.ndarray:
        inputs = [load_for_scoring(_noise(s), spec, TilingOptions()).model_input for s in seeds]
        return np.stack([p.embedding for p in engine.predict(np.stack(inputs))])

    bank = build_bank(embeddings(range(30)), ["genuine"] * 30)
    save_bank(bank, path.with_name("bank.npz"))
    distances = NoveltyGate(bank, 1.0, k=1).novelty(embeddings(range(100, 120)))
    threshold = choose_novelty_threshold(distances, 0.05)
    record = novelty_record(threshold, 0.05, distances, bank, k=1, min_side=MIN_SIDE)
    return tiny_onnx(path, spec, {**card, "novelty": record}, features=8, embedding=True)


def _images() -> dict[str, bytes]:
    return {
        "scan-4000x1500.png": _encode(_scene(1500, 4000, 5, dtype=np.uint16), "PNG"),  # tiled
        "thin-40x300.png": _noise(1, 40, 300),  # under the envelope's 64 px
        "grey-640x480.png": _encode(_scene(480, 640, 4), "PNG"),
        "noise-200x200.png": _noise(2),
        "flat-200x200.png": _encode(np.full((200, 200, 1), 230, np.uint8), "PNG"),
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model, a reference store with the product's five genuine references, and the images in a
    labelled folder under the product (DIR/<label>/<product>/file), as `verity eval` reads products."""
    root = tmp_path_factory.mktemp("one-pipeline")
    model = _gated_model(root)
    engine = OnnxEngine(model, warmup=False)
    store = ReferenceStore(root / "references")
    embed = store.embedder(engine)
    for seed in range(200, 205):
        store.add(
            engine.name, PRODUCT, _noise(seed), source=f"{seed}.png", actor="t", role="admin", embed=embed
        )
    files = {}
    for number, (name, data) in enumerate(sorted(_images().items())):
        path = root / "data" / ("genuine", "counterfeit")[number % 2] / PRODUCT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[name] = path
    return {"root": root, "model": model, "name": engine.name, "files": files}


def _answer(score: float, verdict: str, recognised: bool | None, reasons: list[str]) -> dict[str, Any]:
    return {"score": float(score), "verdict": verdict, "recognised": recognised, "reasons": list(reasons)}


def cli_answers(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    from verity.inference.cli import main as predict_main

    references = str(world["root"] / "references")
    args = ["--model", str(world["model"]), "--json", "--product", PRODUCT, "--references", references]
    assert predict_main([*args, *map(str, world["files"].values())]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for line in lines:
        assert line["reference"]["product"] == PRODUCT
    return {
        Path(line["image"]).name: {
            **_answer(line["score"], line["verdict"], line["recognised"], line["reasons"]),
            "tiles": line["tiles"],
        }
        for line in lines
    }


def server_answers(world: dict[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """{path: {file name: answer}} for /v1/predict, /v1/predict/batch and /v2 infer (BYTES)."""
    root, files = world["root"], world["files"]
    settings = make_settings(root, references_dir=root / "references", max_batch_files=16)
    answers: dict[str, dict[str, dict[str, Any]]] = {
        "/v1/predict": {},
        "/v1/predict/batch": {},
        "/v2 infer": {},
    }
    form = {"modality": "xray", "product": PRODUCT}
    with TestClient(create_app(settings)) as client:
        for name, path in files.items():
            data = path.read_bytes()
            body = client.post("/v1/predict", files={"file": (name, data)}, data=form)
            assert body.status_code == 200, body.text
            result = body.json()
            assert result["reference"]["product"] == PRODUCT
            answers["/v1/predict"][name] = _answer(
                result["score"], result["verdict"], result["recognised"], result["reasons"]
            )
            answers["/v2 infer"][name] = _v2_answer(client, world["name"], data)
        parts = [("files", (name, path.read_bytes())) for name, path in files.items()]
        response = client.post("/v1/predict/batch", files=parts, data=form)
        assert response.status_code == 200, response.text
        for item in response.json()["results"]:
            result = item["result"]
            answers["/v1/predict/batch"][item["filename"]] = _answer(
                result["score"], result["verdict"], result["recognised"], result["reasons"]
            )
    return answers


def _v2_answer(client: TestClient, model: str, data: bytes) -> dict[str, Any]:
    encoded = base64.b64encode(data).decode("ascii")
    body = {
        "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}],
        "parameters": {"product": PRODUCT},
    }
    response = client.post(f"/v2/models/{model}/infer", json=body)
    assert response.status_code == 200, response.text
    outputs = {output["name"]: output["data"][0] for output in response.json()["outputs"]}
    reasons = outputs["reasons"].split(",") if outputs["reasons"] else []
    return _answer(outputs["score"], outputs["verdict"], outputs["recognised"], reasons)


def eval_answers(world: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> dict[str, dict[str, Any]]:
    root = world["root"]
    out = root / "eval"
    args = ["--model", str(world["model"]), "--data", str(root / "data"), "--split", "all", "--out", str(out)]
    references = ["--references", str(root / "references")]
    assert eval_main([*args, *references, "--no-report", "--no-progress"]) == 0
    capsys.readouterr()
    with open(out / "predictions.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    recognised = {"true": True, "false": False, "": None}
    return {
        Path(row["path"]).name: _answer(
            float(row["score"]),
            row["verdict"],
            recognised[row["recognised"]],
            row["reasons"].split(",") if row["reasons"] else [],
        )
        for row in rows
    }


@pytest.mark.slow  # a server, the CLI and an evaluation: seconds of wall time
def test_every_path_gives_every_image_the_same_answer(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    cli = cli_answers(world, capsys)
    assert cli["scan-4000x1500.png"]["tiles"] == 102 and cli["grey-640x480.png"]["tiles"] == 1
    assert cli["thin-40x300.png"]["recognised"] is False
    assert cli["thin-40x300.png"]["reasons"] == ["not_recognised", "smaller_than_training"]
    assert cli["noise-200x200.png"]["recognised"] is True  # like the bank: the gate lets it through
    by_path = {**server_answers(world), "verity eval": eval_answers(world, capsys)}
    for path, answers in by_path.items():
        assert set(answers) == set(cli), path
        for name, answer in answers.items():
            expected = cli[name]
            assert abs(answer["score"] - expected["score"]) <= TOLERANCE, (path, name, answer, expected)
            for field in ("verdict", "recognised", "reasons"):
                assert answer[field] == expected[field], (path, name, field, answer, expected)


def test_the_cli_draws_the_servers_heatmap(world: dict[str, Any], tmp_path: Path) -> None:
    """A dim 16-bit scan: `verity predict --heatmap` writes the very PNG /v1/predict returns, drawn over
    the same display-windowed view (it once drew over the raw model input, nearly black)."""
    from verity.inference.cli import main as predict_main

    dim = np.random.default_rng(7).integers(900, 1400, (480, 640), dtype=np.uint16)
    image = tmp_path / "dim-640x480.png"
    image.write_bytes(_encode(dim, "PNG"))
    out = tmp_path / "heat.png"
    assert predict_main(["--model", str(world["model"]), "--heatmap", str(out), str(image)]) == 0
    settings = make_settings(world["root"], audit_db=tmp_path / "audit.sqlite")
    with TestClient(create_app(settings)) as client:
        form = {"modality": "xray", "return_heatmap": "true"}
        response = client.post("/v1/predict", files={"file": (image.name, image.read_bytes())}, data=form)
    assert response.status_code == 200, response.text
    assert out.read_bytes() == base64.b64decode(response.json()["heatmap_png"])
