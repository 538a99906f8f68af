"""Open Inference Protocol v2 against a running server, with Triton's official HTTP client and with
plain JSON requests built from the published spec."""

from __future__ import annotations

import base64
import sqlite3

import httpx
import numpy as np
import pytest
import tritonclient.http as tritonclient_http  # a dev dependency: a missing client fails, never skips
from api_fixtures import IMAGE_SIZE, LiveServer, image_bytes, server_env

from benchmarks.models import tiny_spec
from verity.inference.preprocess import load_for_model

pytestmark = pytest.mark.slow

PHOTO_SPEC = tiny_spec("photo", IMAGE_SIZE)  # the served photo-test models' spec


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("oip")
    live = LiveServer(server_env(root, VERITY_LOG_JSON="true")).start()
    yield live
    live.stop()


def audit_ids(server: LiveServer) -> set[str]:
    with sqlite3.connect(server.env["VERITY_AUDIT_DB"]) as db:
        return {row[0] for row in db.execute("SELECT request_id FROM predictions WHERE api = 'v2'")}


@pytest.fixture(scope="module")
def client(server):
    return tritonclient_http.InferenceServerClient(url=server.url.removeprefix("http://"))


def test_health_and_metadata_with_triton_client(client) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("photo-test") and client.is_model_ready("photo-test", "1")
    assert not client.is_model_ready("shoes")
    assert client.get_server_metadata()["name"] == "verity"
    meta = client.get_model_metadata("photo-test")
    assert meta["versions"] == ["1", "2"]
    assert meta["inputs"][0] == {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]}


def test_infer_fp32_tensor_with_triton_client(client, server) -> None:
    batch = np.stack([load_for_model(image_bytes(v), PHOTO_SPEC) for v in (0, 255)])
    tensor = tritonclient_http.InferInput("image", list(batch.shape), "FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    result = client.infer("photo-test", [tensor])
    scores = result.as_numpy("score")
    verdicts = [v.decode() for v in result.as_numpy("verdict")]
    assert scores.shape == (2,) and scores[0] < 0.4 < 0.6 < scores[1]
    assert verdicts == ["genuine", "counterfeit"]
    assert result.as_numpy("logits").shape == (2, 2)
    ids = {v.decode() for v in result.as_numpy("request_id")}
    assert ids <= audit_ids(server)
    assert result.get_response()["model_version"] == "2"


def test_infer_bytes_with_triton_client(client) -> None:
    images = np.array([image_bytes(255, fmt="JPEG")], dtype=np.object_)
    tensor = tritonclient_http.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    outputs = [
        tritonclient_http.InferRequestedOutput("verdict", binary_data=False),
        tritonclient_http.InferRequestedOutput("score", binary_data=True),
    ]
    result = client.infer("photo-test", [tensor], model_version="1", outputs=outputs)
    assert result.as_numpy("verdict").tolist() == [b"counterfeit"] or result.as_numpy("verdict").tolist() == [
        "counterfeit"
    ]
    assert result.as_numpy("score")[0] > 0.6 and result.get_response()["model_version"] == "1"


def test_a_modality_names_the_model_serving_it(client) -> None:
    """A console integrated against `xray` follows every change of default model."""
    assert client.is_model_ready("photo") and client.is_model_ready("xray")
    assert client.get_model_metadata("xray")["name"] == "xray-test"
    images = np.array([image_bytes(255, fmt="PNG", mode="L")], dtype=np.object_)
    tensor = tritonclient_http.InferInput("image_bytes", [1], "BYTES")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = client.infer("xray", [tensor])
    assert result.get_response()["model_name"] == "xray-test" and result.as_numpy("score")[0] > 0.6
    assert not client.is_model_ready("photo", "2")  # a version names a model, never a modality


def test_infer_json_both_input_kinds(server) -> None:
    tensor = load_for_model(image_bytes(0), PHOTO_SPEC)
    fp32 = {
        "id": "c-1",
        "inputs": [
            {
                "name": "image",
                "shape": [1, 3, 32, 32],
                "datatype": "FP32",
                "data": tensor.reshape(-1).tolist(),
            }
        ],
    }
    response = httpx.post(f"{server.url}/v2/models/photo-test/infer", json=fp32)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "c-1" and body["model_name"] == "photo-test"
    outputs = {o["name"]: o for o in body["outputs"]}
    assert outputs["verdict"]["data"] == ["genuine"] and outputs["score"]["shape"] == [1]
    assert outputs["request_id"]["data"][0] in audit_ids(server)
    encoded = base64.b64encode(image_bytes(255)).decode()
    as_bytes = {
        "inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [encoded]}],
        "outputs": [{"name": "verdict"}],
        "parameters": {"case_id": "SEZ-7"},
    }
    response = httpx.post(f"{server.url}/v2/models/xray-test/infer", json=as_bytes)
    assert response.status_code == 200, response.text
    assert [o["name"] for o in response.json()["outputs"]] == ["verdict"]


@pytest.mark.parametrize(
    ("path", "payload", "status"),
    [
        (
            "/v2/models/shoes/infer",
            {"inputs": [{"name": "x", "shape": [1], "datatype": "BYTES", "data": ["AA=="]}]},
            404,
        ),
        ("/v2/models/photo-test/infer", {"inputs": []}, 400),
        (
            "/v2/models/photo-test/infer",
            {"inputs": [{"name": "image", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]},
            400,
        ),
        (
            "/v2/models/photo-test/infer",
            {"inputs": [{"name": "image", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 5}]},
            400,
        ),
        (
            "/v2/models/photo-test/infer",
            {"inputs": [{"name": "i", "shape": [1], "datatype": "INT8", "data": [1]}]},
            400,
        ),
        (
            "/v2/models/photo-test/infer",
            {"inputs": [{"name": "i", "shape": [1], "datatype": "BYTES", "data": ["not base64!"]}]},
            400,
        ),
        (
            "/v2/models/photo-test/infer",
            {
                "inputs": [
                    {
                        "name": "i",
                        "shape": [1],
                        "datatype": "BYTES",
                        "data": [base64.b64encode(b"<html></html>").decode()],
                    }
                ]
            },
            415,
        ),
        ("/v2/models/photo-test/versions/9/infer", {"inputs": []}, 404),
    ],
)
def test_errors_are_oip_shaped(server, path: str, payload: dict, status: int) -> None:
    response = httpx.post(server.url + path, json=payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str) and body["error"]


def test_bad_json_and_model_404(server) -> None:
    response = httpx.post(
        f"{server.url}/v2/models/photo-test/infer",
        content=b"{nope",
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400 and isinstance(response.json()["error"], str)
    assert httpx.get(f"{server.url}/v2/models/shoes").status_code == 404
    assert httpx.get(f"{server.url}/v2/models/photo-test/versions/1/ready").json()["ready"] is True


def test_version_metadata(server) -> None:
    meta = httpx.get(f"{server.url}/v2/models/xray-test/versions/1").json()
    assert meta["name"] == "xray-test" and meta["inputs"][0]["shape"] == [-1, 1, 32, 32]
    assert meta["parameters"]["modality"] == "xray"
    assert httpx.get(f"{server.url}/v2/models/xray-test/versions/7").status_code == 404
    assert httpx.get(f"{server.url}/v2").json()["extensions"] == ["binary_tensor_data"]


def test_the_kserve_client_infers_and_checks_health(server) -> None:
    """KServe's own REST client (kserve.InferenceRESTClient, protocol v2), with FP32 tensors as JSON and
    with image BYTES through the binary tensor data extension."""
    import asyncio

    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    model = "photo-test"

    async def run() -> tuple[bool, bool, bool, dict, dict]:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=30))
        try:
            live = await client.is_server_live(server.url)
            ready = await client.is_server_ready(server.url)
            model_ready = await client.is_model_ready(server.url, model)
            batch = np.stack([load_for_model(image_bytes(v), PHOTO_SPEC) for v in (0, 255)])
            tensor = InferInput("image", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch, binary_data=False)
            fp32 = await client.infer(server.url, InferRequest(model, [tensor]), model_name=model)
            images = np.array([image_bytes(255, fmt="JPEG")], dtype=np.object_)
            raw = InferInput("image_bytes", [1], "BYTES")
            raw.set_data_from_numpy(images, binary_data=True)
            binary = await client.infer(server.url, InferRequest(model, [raw]), model_name=model)
        finally:
            await client.close()
        return live, ready, model_ready, fp32, binary

    live, ready, model_ready, fp32, binary = asyncio.run(run())
    assert live and ready and model_ready

    def outputs(response) -> dict:  # noqa: ANN001 - an InferResponse
        return {output.name: output.as_numpy() for output in response.outputs}

    first, second = outputs(fp32), outputs(binary)
    assert first["score"].shape == (2,) and first["score"][0] < 0.4 < 0.6 < first["score"][1]
    def text(value: object) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    assert [text(v) for v in first["verdict"]] == ["genuine", "counterfeit"]
    assert text(second["verdict"][0]) == "counterfeit"
    assert second["score"][0] > 0.6
    ids = {text(v) for v in [*first["request_id"], *second["request_id"]]}
    assert ids <= audit_ids(server)  # every answer the KServe client got was audited
