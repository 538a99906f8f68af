"""`verity export --triton`: the repository's configs parse with Triton's own schema (tritonclient's
model_config_pb2), and its Python-backend model, run against a stand-in for triton_python_backend_utils
(tests/triton_stub) whose calls run the exported classifier with onnxruntime, gives /v1/predict's scores
to 1e-4 for a photo, an X-ray and a tiled scan, on the shipped models (their novelty gates included)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from api_fixtures import make_settings
from fastapi.testclient import TestClient
from google.protobuf import json_format, text_format
from PIL import Image
from triton_schema import model_config_pb2 as load_schema

from verity import cli as verity_cli
from verity.api.app import create_app
from verity.datasets.encode import encode_dicom
from verity.datasets.synth import encode_png16
from verity.inference.engine import read_metadata

model_config_pb2 = load_schema()
SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
STUB = Path(__file__).resolve().parent / "triton_stub"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("triton")
    for model in ("photo-default", "xray-default"):
        argv = ["export", "--triton", str(out), "--model", str(SHIPPED / model), "--max-batch-size", "4"]
        assert verity_cli.main(argv) == 0
    return out


def config(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


def test_the_configs_parse_with_tritons_schema(repository: Path) -> None:
    _, card = read_metadata(next((SHIPPED / "xray-default").glob("*/model.onnx")))
    classifier = config(repository / "xray-default-classifier" / "config.pbtxt")
    assert classifier.platform == "onnxruntime_onnx" and classifier.max_batch_size == 4
    assert classifier.dynamic_batching.max_queue_delay_microseconds == 4000
    assert list(classifier.input[0].dims) == [3, card.spec.image_size, card.spec.image_size]
    assert {output.name for output in classifier.output} >= {"logits", "embedding"}
    assert classifier.instance_group[0].count == 1
    pipeline = config(repository / "xray-default" / "config.pbtxt")
    assert pipeline.backend == "python" and pipeline.input[0].name == "image_bytes"
    (images,) = pipeline.input
    assert images.data_type == model_config_pb2.TYPE_STRING and list(images.dims) == [-1]
    assert [o.name for o in pipeline.output] == ["score", "verdict", "recognised", "reasons", "logits"]
    # Self-describing: the spec and the decision travel in the parameters.
    parameters = {key: value.string_value for key, value in pipeline.parameters.items()}
    assert json.loads(parameters["verity_spec"]) == json.loads(card.spec.to_json())
    assert json.loads(parameters["verity_thresholds"]) == {"alarm": card.thresholds["alarm"],
                                                           "clear": card.thresholds["clear"]}  # fmt: skip
    assert parameters["classifier"] == "xray-default-classifier"
    assert (repository / "xray-default" / "1" / "bank.npz").is_file()


def _stub(monkeypatch: pytest.MonkeyPatch, repository: Path) -> ModuleType:
    monkeypatch.syspath_prepend(str(STUB))
    sys.modules.pop("triton_python_backend_utils", None)
    import triton_python_backend_utils as stub

    monkeypatch.setattr(stub, "REPOSITORY", repository)
    monkeypatch.setattr(stub, "_SESSIONS", {})
    return stub


def _model(repository: Path, name: str):  # noqa: ANN202 - the model class Triton would instantiate
    namespace: dict[str, object] = {}
    exec((repository / name / "1" / "model.py").read_text(), namespace)  # what Triton's loader runs
    model = namespace["TritonPythonModel"]()  # type: ignore[operator]
    parsed = config(repository / name / "config.pbtxt")
    model.initialize({  # the arguments Triton passes: the config as JSON, the model's folder and version
        "model_config": json_format.MessageToJson(parsed, preserving_proto_field_name=True),
        "model_repository": str(repository / name), "model_version": "1",
    })  # fmt: skip
    return model


def _jpeg(size: tuple[int, int], seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG")
    return buffer.getvalue()


def _scan(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scan = np.full((height, width), 52000, np.uint16)
    for _ in range(6):  # boxes of goods, darker where thicker
        x, y = rng.integers(0, width - 60), rng.integers(0, height - 40)
        scan[y : y + 40, x : x + 60] = rng.integers(8000, 30000)
    return scan


def _v1_answers(client: TestClient, name: str, images: list[bytes]) -> list[dict[str, Any]]:
    """/v1/predict's answers for the images, from the model's modality (its name's first word)."""
    modality = name.split("-")[0]
    return [client.post("/v1/predict", files={"file": ("x", image)}, data={"modality": modality}).json()
            for image in images]  # fmt: skip


def _assert_answers_agree(out: dict[str, np.ndarray], expected: list[dict[str, Any]]) -> None:
    """Triton's outputs for a batch say what /v1/predict said: score to 1e-4, verdict, gate, reasons."""
    assert np.allclose(out["score"], [e["score"] for e in expected], atol=1e-4)
    assert [v.decode() for v in out["verdict"]] == [e["verdict"] for e in expected]
    recognised = [{1: True, 0: False, -1: None}[int(v)] for v in out["recognised"]]
    assert recognised == [e["recognised"] for e in expected]
    reasons = [value.decode().split(",") if value else [] for value in out["reasons"]]
    assert reasons == [e["reasons"] for e in expected]


def test_the_python_backend_gives_v1_predicts_answers(repository: Path, monkeypatch, tmp_path: Path) -> None:
    stub = _stub(monkeypatch, repository)
    cases = {
        "photo-default": [_jpeg((240, 320), 1), _jpeg((300, 300), 2)],
        # A DICOS scan, a 16-bit PNG, and a scan long enough to be scored in tiles (over 8 model inputs).
        "xray-default": [encode_dicom(_scan(400, 300, 3)), encode_png16(_scan(500, 200, 4)),
                         encode_png16(_scan(1800, 300, 5))],
    }  # fmt: skip
    settings = make_settings(tmp_path, models_dir=SHIPPED, rate_limit_per_s=0)
    with TestClient(create_app(settings)) as client:
        for name, images in cases.items():
            expected = _v1_answers(client, name, images)
            request = stub.InferenceRequest(inputs=[stub.Tensor("image_bytes", np.array(images, np.object_))])
            (response,) = _model(repository, name).execute([request])
            assert not response.has_error()
            out = {tensor.name(): tensor.as_numpy() for tensor in response.output_tensors()}
            _assert_answers_agree(out, expected)
            assert out["logits"].shape == (len(images), 2)
    assert expected[-1]["tiles"] > 4  # the long scan was tiled, in more tiles than one classifier batch


def test_a_file_that_is_not_an_image_fails_its_request_only(repository: Path, monkeypatch) -> None:
    stub = _stub(monkeypatch, repository)
    model = _model(repository, "photo-default")
    bad = stub.InferenceRequest(inputs=[stub.Tensor("image_bytes", np.array([b"not an image"], np.object_))])
    photo = np.array([_jpeg((64, 64), 9)], np.object_)
    good = stub.InferenceRequest(inputs=[stub.Tensor("image_bytes", photo)])
    missing = stub.InferenceRequest(inputs=[])
    first, second, third = model.execute([bad, good, missing])
    assert first.has_error() and "image" in first.error().message().lower()
    assert not second.has_error() and third.has_error() and "image_bytes" in third.error().message()


def test_export_says_what_it_needs(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        verity_cli.main(["export", "--triton", str(tmp_path / "t")])  # no --model
    assert "--model" in capsys.readouterr().err
    missing = ["export", "--triton", str(tmp_path / "t"), "--model", str(tmp_path / "none")]
    assert verity_cli.main(missing) == 1
    assert "verity export:" in capsys.readouterr().err


def run_ensemble(stub: ModuleType, repository: Path, name: str, inputs: dict[str, np.ndarray]) -> Any:
    """What Triton's ensemble scheduler does with one request: each step's inputs mapped from the tensors
    so far, its outputs added under their mapped names; a step that fails fails the request."""
    ensemble = config(repository / name / "config.pbtxt")
    tensors = dict(inputs)
    for step in ensemble.ensemble_scheduling.step:
        request = stub.InferenceRequest(
            model_name=step.model_name,
            requested_output_names=list(step.output_map),
            inputs=[stub.Tensor(key, tensors[value]) for key, value in step.input_map.items()],
        )
        if config(repository / step.model_name / "config.pbtxt").backend == "python":
            (response,) = _model(repository, step.model_name).execute([request])
        else:
            response = request.exec()
        if response.has_error():
            return response
        for tensor in response.output_tensors():
            tensors[step.output_map[tensor.name()]] = tensor.as_numpy()
    answers = [stub.Tensor(output.name, tensors[output.name]) for output in ensemble.output]
    return stub.InferenceResponse(answers)


def test_the_ensemble_gives_v1_predicts_answers_for_whole_images(repository: Path, monkeypatch,
                                                                   tmp_path: Path) -> None:  # fmt: skip
    stub = _stub(monkeypatch, repository)
    cases = {
        "photo-default": [_jpeg((240, 320), 1), _jpeg((300, 300), 2)],
        "xray-default": [
            encode_dicom(_scan(400, 300, 3)),
            encode_png16(_scan(500, 200, 4)),
            encode_dicom(_scan(200, 160, 6), Modality="MR"),
        ],  # a clinical DICOM: other_modality
    }
    settings = make_settings(tmp_path, models_dir=SHIPPED, rate_limit_per_s=0)
    with TestClient(create_app(settings)) as client:
        for name, images in cases.items():
            expected = _v1_answers(client, name, images)
            batch = np.array(images, np.object_).reshape(-1, 1)  # [B, 1]: one file a batch item
            response = run_ensemble(stub, repository, f"{name}-ensemble", {"image_bytes": batch})
            assert not response.has_error(), response.error().message()
            out = {tensor.name(): tensor.as_numpy().reshape(-1) for tensor in response.output_tensors()}
            _assert_answers_agree(out, expected)
    # A scan the tiling rule scores in tiles goes to the pipeline model, as the ensemble says.
    long_scan = np.array([encode_png16(_scan(1800, 300, 5))], np.object_).reshape(-1, 1)
    refused = run_ensemble(stub, repository, "xray-default-ensemble", {"image_bytes": long_scan})
    assert refused.has_error() and "xray-default model" in refused.error().message()
