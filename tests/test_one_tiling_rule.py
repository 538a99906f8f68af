"""One tiling rule: `verity predict`, /v1/predict, /v1/predict/batch, /v2 infer and `verity eval` give
every image the same score (to 1e-4), photos and X-ray of several sizes, tiled or whole; padding never
decides a score; five different 640x480 images never share one score.

The tiny models have the shipped models' 160 px input, so the sizes tile as the shipped ones do: a
4000x1500 scan in 102 tiles of 320 px (6 x 17), a 640x480 image whole.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from benchmarks.models import tiny_card, tiny_onnx
from verity.api.app import create_app
from verity.inference.cli import main as predict_main
from verity.inference.engine import OnnxEngine
from verity.inference.preprocess import to_model_input
from verity.inference.spec import resolve_spec
from verity.inference.tiling import TilingOptions, load_for_scoring, plan_tiles, score_scan, should_tile
from verity.training.eval_cli import main as eval_main

ROOT = Path(__file__).resolve().parents[1]
SIZE = 160  # the shipped models' input
TOLERANCE = 1e-4


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(pixels[..., 0] if pixels.ndim == 3 and pixels.shape[2] == 1 else pixels)
    image.save(buffer, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _scene(height: int, width: int, seed: int, channels: int = 1, dtype: type = np.uint8) -> np.ndarray:
    """A dark, noisy scene with a few bright boxes: tiles differ, so the max over them is informative."""
    rng = np.random.default_rng(seed)
    top = 65535 if dtype == np.uint16 else 255
    pixels = rng.uniform(0.05, 0.3, (height, width, channels)) * top
    for _ in range(4):
        h, w = rng.integers(height // 10 + 1, height // 3 + 2), rng.integers(width // 12 + 1, width // 4 + 2)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        pixels[y : y + h, x : x + w] = rng.uniform(0.5, 1.0, channels) * top
    return pixels.astype(dtype)


def five_images() -> dict[str, np.ndarray]:
    """Flat red, white, black, noise and drawn shapes, 640x480 RGB: the images that once shared 0.554."""
    shapes = Image.new("RGB", (640, 480), (230, 230, 230))
    draw = ImageDraw.Draw(shapes)
    draw.rectangle((60, 80, 300, 260), fill=(40, 40, 40))
    draw.ellipse((360, 200, 600, 440), fill=(30, 60, 200))
    return {
        "red": np.full((480, 640, 3), (220, 20, 20), np.uint8),
        "white": np.full((480, 640, 3), 255, np.uint8),
        "black": np.zeros((480, 640, 3), np.uint8),
        "noise": np.random.default_rng(3).integers(0, 256, (480, 640, 3), dtype=np.uint8),
        "shapes": np.asarray(shapes),
    }


# name -> (encoded image, tiles the rule gives it at the default options)
def modality_images(modality: str) -> dict[str, tuple[bytes, int]]:
    if modality == "photo":  # photos are framed products: scored whole at any size
        return {
            "photo-640x480.jpg": (_encode(_scene(480, 640, 1, 3), "JPEG"), 1),
            "photo-4000x1500.jpg": (_encode(_scene(1500, 4000, 2, 3), "JPEG"), 1),
            "photo-1200x900.png": (_encode(_scene(900, 1200, 3, 3), "PNG"), 1),
        }
    return {
        "xray-640x480.png": (_encode(_scene(480, 640, 4), "PNG"), 1),
        "xray-4000x1500-16bit.png": (_encode(_scene(1500, 4000, 5, dtype=np.uint16), "PNG"), 102),
        "xray-4000x200-thin.png": (_encode(_scene(200, 4000, 6), "PNG"), 17),  # thinner than a tile
        "xray-1400x1300-rgb.jpg": (_encode(np.repeat(_scene(1300, 1400, 7), 3, axis=2), "JPEG"), 36),
    }


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny 160 px models in a models folder, and per modality a labelled folder of its images."""
    root = tmp_path_factory.mktemp("one-rule")
    models, folders = {}, {}
    for modality in ("photo", "xray"):
        spec = resolve_spec(modality, override={"image_size": SIZE})
        card = tiny_card(spec, alarm=0.7, clear=0.3)
        models[modality] = tiny_onnx(
            root / "models" / card["name"] / card["version"] / "model.onnx", spec, card
        )
        images = {name: data for name, (data, _) in modality_images(modality).items()}
        images.update({f"five-{name}.png": _encode(pixels, "PNG") for name, pixels in five_images().items()})
        folders[modality] = root / f"data-{modality}"
        for number, (name, data) in enumerate(sorted(images.items())):
            label = ("genuine", "counterfeit")[number % 2]  # both labels, so evaluation has its metrics
            path = folders[modality] / label / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    return {"root": root, "models": models, "folders": folders}


def _files(folder: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted(folder.glob("*/*"))}


def cli_scores(model: Path, files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> dict[str, dict]:
    assert predict_main(["--model", str(model), "--json", *map(str, files.values())]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    return {Path(line["image"]).name: line for line in lines}


def eval_scores(model: Path, folder: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, float]:
    args = ["--model", str(model), "--data", str(folder), "--split", "all", "--out", str(out)]
    assert eval_main([*args, "--no-report", "--no-progress"]) == 0
    capsys.readouterr()
    with open(out / "predictions.csv", encoding="utf-8") as handle:
        return {Path(row["path"]).name: float(row["score"]) for row in csv.DictReader(handle)}


def server_scores(
    root: Path, modality: str, model_name: str, files: dict[str, Path]
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """(/v1/predict, /v1/predict/batch, /v2 infer with the encoded image as BYTES) scores by file name."""
    settings = make_settings(root, audit_db=root / f"audit-{modality}.sqlite")
    v1, batch, v2 = {}, {}, {}
    with TestClient(create_app(settings)) as client:
        for name, path in files.items():
            data = path.read_bytes()
            response = client.post("/v1/predict", files={"file": (name, data)}, data={"modality": modality})
            assert response.status_code == 200, response.text
            v1[name] = response.json()["score"]
            encoded = base64.b64encode(data).decode("ascii")
            body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}]}
            response = client.post(f"/v2/models/{model_name}/infer", json=body)
            assert response.status_code == 200, response.text
            outputs = {output["name"]: output for output in response.json()["outputs"]}
            v2[name] = outputs["score"]["data"][0]
        names = list(files)[:6]  # one batch request (max_batch_files) holding tiled and whole images
        parts = [("files", (name, files[name].read_bytes())) for name in names]
        response = client.post("/v1/predict/batch", files=parts, data={"modality": modality})
        assert response.status_code == 200, response.text
        for item in response.json()["results"]:
            batch[item["filename"]] = item["result"]["score"]
    return v1, batch, v2


def _assert_all_agree(reference: dict[str, float], scores_by_path: dict[str, dict[str, float]]) -> None:
    """Each path's score for each image is the CLI's to TOLERANCE."""
    for path, scores in scores_by_path.items():
        for name, value in scores.items():
            assert abs(value - reference[name]) <= TOLERANCE, (
                f"{path} scored {name} {value}, the CLI {reference[name]}"
            )


@pytest.mark.slow  # seconds of wall time: make test-fast stays under a minute
@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_every_path_gives_every_image_the_same_score(
    setup: dict, modality: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, folder = setup["models"][modality], setup["folders"][modality]
    files = _files(folder)
    cli = cli_scores(model, files, capsys)
    expected_tiles = {name: tiles for name, (_, tiles) in modality_images(modality).items()}
    for name, tiles in expected_tiles.items():
        assert cli[name]["tiles"] == tiles, (name, cli[name])
    assert all(cli[f"five-{name}.png"]["tiles"] == 1 for name in five_images())  # 640x480: scored whole
    reference = {name: line["score"] for name, line in cli.items()}
    v1, batch, v2 = server_scores(setup["root"], modality, f"tiny-{modality}", files)
    evaluated = eval_scores(model, folder, setup["root"] / f"eval-{modality}", capsys)
    assert set(v1) == set(v2) == set(evaluated) == set(reference) and len(batch) == 6
    by_path = {"/v1/predict": v1, "/v1/predict/batch": batch, "/v2 infer": v2, "eval": evaluated}
    _assert_all_agree(reference, by_path)
    metrics = json.loads((setup["root"] / f"eval-{modality}" / "metrics.json").read_text())
    assert metrics["tiling"]["tiled_images"] == sum(tiles > 1 for tiles in expected_tiles.values())


@pytest.mark.parametrize("modality", ["photo", "xray"])
def test_five_different_images_get_five_different_scores_on_every_path(
    setup: dict, modality: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model, folder = setup["models"][modality], setup["folders"][modality]
    files = {name: path for name, path in _files(folder).items() if name.startswith("five-")}
    v1, _, v2 = server_scores(setup["root"], modality, f"tiny-{modality}", files)
    evaluated = {
        name: score
        for name, score in eval_scores(model, folder, setup["root"] / "e5", capsys).items()
        if name in files
    }
    cli = {name: line["score"] for name, line in cli_scores(model, files, capsys).items()}
    for path, scores in (("cli", cli), ("/v1/predict", v1), ("/v2 infer", v2), ("eval", evaluated)):
        rounded = {name: round(score, 4) for name, score in scores.items()}
        assert len(rounded) == 5 and len(set(rounded.values())) == 5, (path, rounded)


@pytest.fixture(scope="module")
def xray_engine(setup: dict) -> OnnxEngine:
    return OnnxEngine(setup["models"]["xray"], provider="cpu", warmup=False)


def test_the_rule_tiles_large_xray_scans_only() -> None:
    xray, photo = (
        resolve_spec("xray", override={"image_size": SIZE}),
        resolve_spec("photo", override={"image_size": SIZE}),
    )
    default = TilingOptions()
    assert not should_tile((480, 640), xray, default)  # 4 model inputs long: whole
    assert not should_tile((1000, 1280), xray, default)  # exactly 8: whole
    assert should_tile((1000, 1281), xray, default) and should_tile((1500, 4000), xray, default)
    assert not should_tile((1500, 4000), photo, default)  # a photo frames one product
    assert should_tile((480, 640), photo, TilingOptions(mode="on"))  # "on": anything over one tile (320)
    assert not should_tile((300, 320), photo, TilingOptions(mode="on"))
    assert not should_tile((1500, 4000), xray, TilingOptions(mode="off"))
    with pytest.raises(ValueError, match="Invalid tiling mode 'sometimes'"):
        TilingOptions(mode="sometimes")


def test_every_tile_lies_inside_the_image() -> None:
    for height, width in ((1500, 4000), (1281, 1281), (200, 4000), (4000, 321)):
        boxes, grid = plan_tiles(height, width, 320, 0.25, max_tiles=128)
        assert len(boxes) == grid[0] * grid[1]
        for top, left in boxes:
            assert 0 <= top <= height - min(320, height) and 0 <= left <= width - min(320, width)
        assert max(top for top, _ in boxes) + min(320, height) == height  # spread to the border, flush
        assert max(left for _, left in boxes) + min(320, width) == width


def test_padding_never_raises_a_scan_score(xray_engine: OnnxEngine) -> None:
    """The tiny model scores brightness as counterfeit and the X-ray letterbox pads with air (1.0, the
    brightest value): a padded or empty tile would lift a dark scan's max. A flat dark scan must score
    exactly what one tile of it scores, and a scan thinner than a tile what the spec makes of a whole
    image of that crop."""
    options = TilingOptions()
    dark = np.full((1500, 4000, 1), 20, np.uint8)
    loaded = load_for_scoring(_encode(dark, "PNG"), xray_engine.spec, options)
    assert loaded.pixels is not None
    scan = score_scan(loaded.pixels, xray_engine, options)
    one_tile = xray_engine.predict([to_model_input(dark[:320, :320], xray_engine.spec)])[0].score
    assert len(scan.tiles) == 102 and max(t.score for t in scan.tiles) == pytest.approx(one_tile, abs=1e-6)
    assert all((t.height, t.width) == (320, 320) for t in scan.tiles)
    thin = np.full((200, 4000, 1), 20, np.uint8)
    thin_scan = score_scan(thin, xray_engine, options)
    whole_crop = xray_engine.predict([to_model_input(thin[:, :320], xray_engine.spec)])[0].score
    assert thin_scan.score == pytest.approx(whole_crop, abs=1e-6)
    assert all(t.height == 200 for t in thin_scan.tiles)


@pytest.mark.slow
def test_shipped_xray_model_agrees_on_every_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The real case: xray-default on a 4000x1500 16-bit scan (tiled), a 640x480 grey image and the five
    640x480 images (whole), through the CLI, /v1, /v2 and eval; the five keep five different scores."""
    model = ROOT / "checkpoints" / "xray-default"
    folder = tmp_path / "data"
    images = {
        "scan-4000x1500.png": _encode(_scene(1500, 4000, 11, dtype=np.uint16), "PNG"),
        "grey-640x480.png": _encode(np.full((480, 640, 1), 128, np.uint8), "PNG"),
        **{f"five-{name}.jpg": _encode(pixels, "JPEG") for name, pixels in five_images().items()},
    }
    for number, (name, data) in enumerate(sorted(images.items())):
        path = folder / ("genuine", "counterfeit")[number % 2] / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    files = _files(folder)
    cli = cli_scores(model, files, capsys)
    assert cli["scan-4000x1500.png"]["tiles"] > 1 and cli["grey-640x480.png"]["tiles"] == 1
    reference = {name: line["score"] for name, line in cli.items()}
    settings_root = tmp_path / "server"
    (settings_root / "models").parent.mkdir(parents=True, exist_ok=True)
    (settings_root / "models").symlink_to(ROOT / "checkpoints")
    v1, batch, v2 = server_scores(settings_root, "xray", "xray-default", files)
    evaluated = eval_scores(model, folder, tmp_path / "eval", capsys)
    by_path = {"/v1/predict": v1, "/v1/predict/batch": batch, "/v2 infer": v2, "eval": evaluated}
    _assert_all_agree(reference, by_path)
    five = {round(score, 4) for name, score in reference.items() if name.startswith("five-")}
    assert len(five) == 5, reference
