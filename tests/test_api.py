"""The /v1 API in-process (TestClient): predictions, batches, error codes, feedback, metrics, audit rows."""

from __future__ import annotations

import base64
import io
import json
import time
from pathlib import Path

import pytest
from api_fixtures import (
    BRIGHT,
    DARK,
    assert_error,
    audit_rows,
    image_bytes,
    make_models_dir,
    make_settings,
    predict,
)
from fastapi.testclient import TestClient
from PIL import Image

from verity.api.app import create_app
from verity.api.audit import AuditError, SQLiteAuditStore
from verity.api.settings import Settings


def test_health_ready_and_models(client: TestClient, models_dir: Path) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {
        "ready": True,
        "defaults": {"photo": "photo-test/2", "xray": "xray-test/1"},
        "models_dir": str(models_dir),
        "message": f"Serving photo with photo-test/2, xray with xray-test/1 from {models_dir}.",
    }
    models = client.get("/v1/models").json()
    assert models["defaults"] == {"photo": "photo-test/2", "xray": "xray-test/1"}
    listed = {(m["name"], m["version"]): m for m in models["models"]}
    assert set(listed) == {("photo-test", "1"), ("photo-test", "2"), ("xray-test", "1")}
    assert listed[("photo-test", "2")]["default"] and not listed[("photo-test", "1")]["default"]
    assert listed[("xray-test", "1")]["input_shape"] == [1, 32, 32]
    # Lineage: what the model learnt from and where its weights started (none: not fine-tuned).
    newest = listed[("photo-test", "2")]
    assert newest["data_fingerprint"] == "none" and newest["lineage"] is None and newest["weak"] is False


def test_predict_verdicts_and_audit(client: TestClient, tmp_path: Path) -> None:
    dark = predict(client, DARK, station_id="gate-3", case_id="SEZ-1")
    bright = predict(client, BRIGHT)
    xray = predict(client, image_bytes(0, mode="L"), modality="xray")
    assert dark.status_code == bright.status_code == xray.status_code == 200
    body = dark.json()
    assert body["verdict"] == "genuine" and body["score"] <= body["thresholds"]["clear"]
    assert bright.json()["verdict"] == "counterfeit" and bright.json()["score"] >= 0.6
    assert body["thresholds"] == {"alarm": 0.6, "clear": 0.4}
    assert body["model"] == {"name": "photo-test", "version": "2"} and body["modality"] == "photo"
    assert body["station_id"] == "gate-3" and body["case_id"] == "SEZ-1" and body["heatmap_png"] is None
    assert len(body["image_sha256"]) == 64 and body["latency_ms"] > 0
    assert xray.json()["model"] == {"name": "xray-test", "version": "1"}
    rows = audit_rows(tmp_path)
    for response in (dark, bright, xray):
        row = rows[response.json()["request_id"]]
        assert row[1:] == (
            response.json()["verdict"],
            response.json()["score"],
            response.json()["model"]["version"],
        )


def test_every_200_has_an_audit_row(client: TestClient, tmp_path: Path) -> None:
    ids = []
    for value in (0, 60, 190, 200, 255):
        response = predict(client, image_bytes(value))
        assert response.status_code == 200
        ids.append(response.json()["request_id"])
    assert predict(client, b"not an image").status_code == 415
    batch = client.post(
        "/v1/predict/batch",
        data={"modality": "photo"},
        files=[("files", ("a.png", DARK)), ("files", ("b.png", b"junk")), ("files", ("c.png", BRIGHT))],
    )
    ids += [
        item["result"]["request_id"]
        for item in batch.json()["results"]
        if "result" in item and item["result"]
    ]
    rows = audit_rows(tmp_path)
    assert len(ids) == 7 and set(ids) == set(rows)


def test_heatmap_on_request(client: TestClient) -> None:
    response = predict(client, BRIGHT, return_heatmap="true")
    assert response.status_code == 200
    png = base64.b64decode(response.json()["heatmap_png"])
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and min(image.size) >= 32


def test_batch_bad_file_fails_alone(client: TestClient) -> None:
    files = [
        ("files", ("a.png", DARK)),
        ("files", ("b.txt", b"hello")),
        ("files", ("c.png", BRIGHT)),
        ("files", ("d.png", DARK[:30])),
    ]
    response = client.post("/v1/predict/batch", data={"modality": "photo", "case_id": "SEZ-9"}, files=files)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["index"] for r in results] == [0, 1, 2, 3]
    assert results[0]["result"]["verdict"] == "genuine" and results[2]["result"]["verdict"] == "counterfeit"
    assert results[1]["error"]["code"] == "unsupported_media_type" and results[1]["result"] is None
    assert results[3]["error"]["code"] == "undecodable_image"
    assert results[0]["result"]["case_id"] == "SEZ-9"
    assert results[0]["result"]["request_id"] == f"{response.json()['request_id']}-0"


def test_batch_too_many_files(tmp_path: Path, models_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, max_batch_files=2))) as client:
        files = [("files", (f"{i}.png", DARK)) for i in range(3)]
        assert_error(
            client.post("/v1/predict/batch", data={"modality": "photo"}, files=files), 422, "too_many_files"
        )


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"", 400, "undecodable_image"),
        (DARK[: len(DARK) // 2], 400, "undecodable_image"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", 415, "unsupported_media_type"),
        (b"just some text pretending to be a jpg", 415, "unsupported_media_type"),
    ],
)
def test_bad_images(client: TestClient, data: bytes, status: int, code: str) -> None:
    assert_error(predict(client, data), status, code)
    assert client.get("/healthz").status_code == 200


def test_image_too_large_in_pixels(tmp_path: Path, models_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, max_pixels=1000))) as client:
        assert_error(predict(client, image_bytes(0, size=(100, 100))), 413, "image_too_large")


def test_body_limit_before_reading(tmp_path: Path, models_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, max_upload_bytes=4096))) as client:
        big = image_bytes(0, size=(400, 400), fmt="BMP")
        # Declared length over the limit: refused from the header.
        assert_error(predict(client, big), 413, "request_too_large")
        # Chunked (no Content-Length): counted while streaming and cut off.
        seen = []

        def chunks():
            for start in range(0, 2_000_000, 65536):
                seen.append(start)
                yield b"x" * 65536

        response = client.post(
            "/v1/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=abc"}
        )
        assert_error(response, 413, "request_too_large")  # (the live-server suite checks the early cut-off)
        assert predict(client, DARK).status_code == 200


@pytest.mark.parametrize(
    "form", [{}, {"modality": "infrared"}, {"modality": "photo", "return_heatmap": "maybe"}]
)
def test_bad_fields_422(client: TestClient, form: dict) -> None:
    body = assert_error(
        client.post("/v1/predict", data=form, files={"file": ("a.png", DARK)}), 422, "invalid_fields"
    )
    assert body["error"]["message"]


def test_missing_file_and_unknown_route(client: TestClient) -> None:
    assert_error(client.post("/v1/predict", data={"modality": "photo"}), 422, "invalid_fields")
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")


def test_feedback(client: TestClient, tmp_path: Path) -> None:
    request_id = predict(client, BRIGHT).json()["request_id"]
    ok = client.post(
        "/v1/feedback", json={"request_id": request_id, "confirmed_label": "counterfeit", "notes": "seized"}
    )
    assert ok.status_code == 200 and ok.json() == {
        "request_id": request_id,
        "confirmed_label": "counterfeit",
        "recorded": True,
        "image_kept": True,  # the test settings store images
        "note": None,
        "alerts": 0,  # no alert endpoint is set
    }
    assert_error(client.post("/v1/feedback", json={"request_id": "nope", "confirmed_label": "genuine"}), 404)
    assert_error(
        client.post("/v1/feedback", json={"request_id": request_id, "confirmed_label": "maybe"}), 422
    )
    assert_error(
        client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}), 422
    )


def test_feedback_says_plainly_when_the_image_is_not_kept(tmp_path: Path) -> None:
    make_models_dir(tmp_path)
    with TestClient(create_app(make_settings(tmp_path, store_images=False))) as client:
        request_id = predict(client, BRIGHT).json()["request_id"]
        confirmation = {"request_id": request_id, "confirmed_label": "counterfeit"}
        body = client.post("/v1/feedback", json=confirmation).json()
    assert body["recorded"] is True and body["image_kept"] is False
    assert "VERITY_STORE_IMAGES" in body["note"]


def test_metrics(client: TestClient) -> None:
    predict(client, BRIGHT)
    predict(client, b"junk")
    text = client.get("/metrics").text
    assert 'verity_requests_total{method="POST",route="/v1/predict",status="200"} 1.0' in text
    assert 'verity_requests_total{method="POST",route="/v1/predict",status="415"} 1.0' in text
    assert 'verity_predictions_total{modality="photo",model_version="2",verdict="counterfeit"} 1.0' in text
    assert 'verity_model_info{modality="photo",name="photo-test",version="2"} 1.0' in text
    assert "verity_request_latency_seconds_bucket" in text and "verity_batch_size_count" in text
    assert "verity_queue_depth" in text


def test_openapi_documents_errors_and_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    predict_op = schema["paths"]["/v1/predict"]["post"]
    assert {"400", "401", "403", "413", "415", "422", "503"} <= set(predict_op["responses"])
    assert "example" in schema["components"]["schemas"]["PredictionResult"]
    assert "/v2/models/{name}/infer" in schema["paths"]


def test_large_xray_scan_is_tiled(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, tile_scale=1.0, max_tiles=60)  # the default rule, tiling "auto"
    scan = image_bytes(255, size=(400, 80), mode="L")  # over 8 inputs of 32 px: 32 px tiles, several
    with TestClient(create_app(settings)) as client:
        response = predict(client, scan, modality="xray", return_heatmap="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tiles"] > 1 and body["verdict"] == "counterfeit"
        assert Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))).size == (400, 80)
        small = predict(client, image_bytes(255, size=(200, 80), mode="L"), modality="xray").json()
        assert small["tiles"] is None  # under 8 model inputs long: scored whole, through the batcher
        photo = predict(client, image_bytes(0, size=(400, 80)), modality="photo").json()
        assert photo["tiles"] is None  # "auto" tiles X-ray only
        huge = predict(client, image_bytes(0, size=(2000, 2000), mode="L"), modality="xray").json()
        assert 1 < huge["tiles"] <= 60  # "auto" tiles coarser until the scan fits the tile limit
    with TestClient(create_app(make_settings(tmp_path, tile_scale=1.0, max_tiles=60, tiling="on"))) as client:
        huge = predict(client, image_bytes(0, size=(2000, 2000), mode="L"), modality="xray")
        assert_error(huge, 413, "too_many_tiles")  # "on" asked for the detail: refused, never coarsened


class BrokenAudit(SQLiteAuditStore):
    def record(self, records, alerts=()):
        raise AuditError("disk full")


def test_audit_failure_gives_503_never_a_verdict(tmp_path: Path, settings: Settings) -> None:
    with TestClient(create_app(settings, audit=BrokenAudit(tmp_path / "broken.sqlite"))) as client:
        response = predict(client, BRIGHT)
        body = assert_error(response, 503, "audit_unavailable")
        assert '"score"' not in json.dumps(body) and response.headers["retry-after"]
        batch = client.post(
            "/v1/predict/batch", data={"modality": "photo"}, files=[("files", ("a.png", DARK))]
        )
        assert_error(batch, 503, "audit_unavailable")


class SlowEngine:
    """Wraps the real engine and makes each batch take a while, so the queue fills."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def predict(self, batch, with_cam=False):
        time.sleep(0.3)
        return self._engine.predict(batch, with_cam=with_cam)


def test_queue_full_is_503_with_retry_after(tmp_path: Path, models_dir: Path) -> None:
    import asyncio

    import httpx

    from verity.inference.engine import OnnxEngine

    settings = make_settings(tmp_path, batch_max_size=1, batch_max_queue=1, retry_after_s=2)
    app = create_app(settings, engine_factory=lambda path: SlowEngine(OnnxEngine(path, warmup=False)))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            "/v1/predict", data={"modality": "photo"}, files={"file": ("a.png", DARK)}
                        )
                        for _ in range(6)
                    )
                )

    responses = asyncio.run(scenario())
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses and set(statuses) <= {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            assert_error(response, 503, "queue_full")
            assert response.headers["retry-after"] == "2"
    assert len(audit_rows(tmp_path)) == statuses.count(200)
