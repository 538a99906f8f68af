"""The /v1 API in-process (TestClient): every route and error code, auth on and off, audit rows."""

from __future__ import annotations

import base64
import io
import json
import sqlite3
import time
from pathlib import Path

import pytest
from api_fixtures import build_model_bytes, image_bytes, make_models_dir, write_model
from fastapi.testclient import TestClient
from PIL import Image
from verity.api.app import create_app
from verity.api.audit import AuditError, SQLiteAuditStore
from verity.api.auth import KeyStore
from verity.api.cli import audit_main, keys_main
from verity.api.settings import Settings

DARK, BRIGHT = image_bytes(0), image_bytes(255)


def make_settings(tmp_path: Path, **overrides) -> Settings:
    values = dict(
        models_dir=tmp_path / "models",
        audit_db=tmp_path / "audit.sqlite",
        keys_file=tmp_path / "keys.json",
        image_store_dir=tmp_path / "images",
        background_load=False,
        warmup=False,
        store_images=True,
    )
    values.update(overrides)
    return Settings(**values)


@pytest.fixture()
def models_dir(tmp_path: Path) -> Path:
    return make_models_dir(tmp_path)


@pytest.fixture()
def client(tmp_path: Path, models_dir: Path):
    with TestClient(create_app(make_settings(tmp_path))) as test_client:
        yield test_client


def predict(client: TestClient, data: bytes = DARK, modality: str = "photo", headers=None, **fields):
    form = {"modality": modality, **{k: str(v) for k, v in fields.items()}}
    return client.post(
        "/v1/predict", files={"file": ("item.png", data, "image/png")}, data=form, headers=headers
    )


def audit_rows(tmp_path: Path) -> dict[str, tuple]:
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        return {
            row[0]: row
            for row in db.execute("SELECT request_id, verdict, score, model_version FROM predictions")
        }


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "request_id"}, body
    assert body["error"]["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    if code:
        assert body["error"]["code"] == code
    return body


def test_health_ready_and_models(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "defaults": {"photo": "photo-test/2", "xray": "xray-test/1"}}
    models = client.get("/v1/models").json()
    assert models["defaults"] == {"photo": "photo-test/2", "xray": "xray-test/1"}
    listed = {(m["name"], m["version"]): m for m in models["models"]}
    assert set(listed) == {("photo-test", "1"), ("photo-test", "2"), ("xray-test", "1")}
    assert listed[("photo-test", "2")]["default"] and not listed[("photo-test", "1")]["default"]
    assert listed[("xray-test", "1")]["input_shape"] == [1, 32, 32]


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


def test_every_route_records_a_keyed_station_as_itself(tmp_path: Path, models_dir: Path) -> None:
    """One rule on /v1 and /v2: a station key naming another station is refused, never replaced."""
    store = KeyStore(tmp_path / "keys.json")
    _, station_key = store.add("gate-3")
    headers = {"X-API-Key": station_key}
    image = base64.b64encode(DARK).decode()
    infer = {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": [image, image]}]}
    with TestClient(create_app(make_settings(tmp_path, require_api_keys=True))) as client:
        route = "/v2/models/photo-test/infer"
        other = client.post(route, json={**infer, "parameters": {"station_id": "gate-9"}}, headers=headers)
        assert other.status_code == 403 and "gate-3" in other.json()["error"]  # OIP errors: {"error": text}
        own = client.post(route, json={**infer, "parameters": {"station_id": "gate-3"}}, headers=headers)
        assert own.status_code == 200, own.text
        batch = client.post(
            "/v1/predict/batch", files=[("files", ("a.png", DARK)), ("files", ("b.png", DARK))],
            data={"modality": "photo", "station_id": "gate-9"}, headers=headers,
        )  # fmt: skip
        assert_error(batch, 403, "forbidden")
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        stations = {row[0] for row in db.execute("SELECT station_id FROM predictions")}
    assert stations == {"gate-3"}


def test_auth_required(tmp_path: Path, models_dir: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, station_key = store.add("gate-3")
    _, admin_key = store.add("hq", role="admin")
    with TestClient(create_app(make_settings(tmp_path, require_api_keys=True))) as client:
        assert client.get("/healthz").status_code == 200
        assert_error(predict(client), 401, "unauthorized")
        assert_error(predict(client, headers={"X-API-Key": "vk_nope_nope"}), 401)
        assert_error(client.get("/v1/models"), 401)
        ok = predict(client, headers={"X-API-Key": station_key})
        assert ok.status_code == 200 and ok.json()["station_id"] == "gate-3"
        bearer = predict(client, headers={"Authorization": f"Bearer {station_key}"})
        assert bearer.status_code == 200
        assert_error(
            predict(client, headers={"X-API-Key": station_key}, station_id="gate-9"), 403, "forbidden"
        )
        assert_error(client.post("/v1/models/reload", headers={"X-API-Key": station_key}), 403, "forbidden")
        assert client.post("/v1/models/reload", headers={"X-API-Key": admin_key}).status_code == 200
        # Revoked with the CLI, refused at once, no restart.
        key_id = station_key.split("_")[1]
        assert keys_main(["--keys-file", str(tmp_path / "keys.json"), "revoke", key_id]) == 0
        time.sleep(0.01)
        assert_error(predict(client, headers={"X-API-Key": station_key}), 401)


def test_auth_off_allows_anonymous_but_checks_presented_keys(client: TestClient) -> None:
    assert predict(client).status_code == 200
    assert_error(predict(client, headers={"X-API-Key": "vk_bad_key"}), 401)
    assert client.post("/v1/models/reload").status_code == 200


def test_keys_cli_add_list(tmp_path: Path, capsys) -> None:
    keys_file = str(tmp_path / "k.json")
    assert keys_main(["--keys-file", keys_file, "add", "--station", "gate-1"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("vk_") and secret not in (tmp_path / "k.json").read_text()
    assert KeyStore(keys_file).verify(secret).station_id == "gate-1"
    assert keys_main(["--keys-file", keys_file, "list"]) == 0
    assert "gate-1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Known key ids"):
        keys_main(["--keys-file", keys_file, "revoke", "deadbeef"])


def test_feedback(client: TestClient, tmp_path: Path) -> None:
    request_id = predict(client, BRIGHT).json()["request_id"]
    ok = client.post(
        "/v1/feedback", json={"request_id": request_id, "confirmed_label": "counterfeit", "notes": "seized"}
    )
    assert ok.status_code == 200 and ok.json() == {
        "request_id": request_id,
        "confirmed_label": "counterfeit",
        "recorded": True,
    }
    assert_error(client.post("/v1/feedback", json={"request_id": "nope", "confirmed_label": "genuine"}), 404)
    assert_error(
        client.post("/v1/feedback", json={"request_id": request_id, "confirmed_label": "maybe"}), 422
    )
    assert_error(
        client.post("/v1/feedback", content=b"{not json", headers={"content-type": "application/json"}), 422
    )


def test_reload_success_and_failure(client: TestClient, models_dir: Path) -> None:
    before = predict(client, DARK).json()["model"]
    assert before == {"name": "photo-test", "version": "2"}
    write_model(models_dir, "photo-test", "10", "photo")
    report = client.post("/v1/models/reload").json()
    assert report["ok"] and report["loaded"] == ["photo-test/10"]
    assert sorted(report["kept"]) == ["photo-test/1", "photo-test/2", "xray-test/1"]
    assert report["defaults"]["photo"] == "photo-test/10"
    assert predict(client, DARK).json()["model"]["version"] == "10"
    # A corrupt new version, and a corrupted existing one: both reported, the old ones keep serving.
    (models_dir / "photo-test" / "11").mkdir()
    (models_dir / "photo-test" / "11" / "model.onnx").write_bytes(b"\x08\x01garbage")
    (models_dir / "photo-test" / "10" / "model.onnx").write_bytes(build_model_bytes("x", "y")[:200])
    failed = client.post("/v1/models/reload").json()
    assert not failed["ok"] and len(failed["failed"]) == 2
    assert failed["defaults"]["photo"] == "photo-test/10" and "photo-test/10" in failed["kept"]
    response = predict(client, BRIGHT)
    assert response.status_code == 200 and response.json()["model"]["version"] == "10"
    # Removing a version unloads it.
    for path in (models_dir / "photo-test").glob("1*/model.onnx"):
        path.unlink()
    report = client.post("/v1/models/reload").json()
    assert "photo-test/10" in report["unloaded"] and report["defaults"]["photo"] == "photo-test/2"


def test_pinned_version(tmp_path: Path, models_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, pinned_models={"photo": "photo-test/1"}))) as client:
        assert predict(client).json()["model"] == {"name": "photo-test", "version": "1"}


def test_readyz_503_until_loaded(tmp_path: Path, models_dir: Path) -> None:
    from verity.inference.engine import OnnxEngine

    def slow_engine(path):
        time.sleep(1.0)
        return OnnxEngine(path, warmup=True)

    app = create_app(make_settings(tmp_path, background_load=True), engine_factory=slow_engine)
    with TestClient(app) as client:
        first = client.get("/readyz")
        assert first.status_code == 503 and first.headers["retry-after"] == "1"
        assert client.get("/healthz").status_code == 200
        assert_error(predict(client), 503, "not_ready")
        for _ in range(100):
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        assert predict(client).status_code == 200


def test_no_model_for_modality(tmp_path: Path) -> None:
    write_model(tmp_path / "models", "photo-test", "1", "photo")
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = predict(client, modality="xray")
        assert_error(response, 503, "no_model")
        assert response.headers["retry-after"] == "1"


class BrokenAudit(SQLiteAuditStore):
    def record(self, records):
        raise AuditError("disk full")


def test_audit_failure_gives_503_never_a_verdict(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path)
    with TestClient(create_app(settings, audit=BrokenAudit(tmp_path / "broken.sqlite"))) as client:
        response = predict(client, BRIGHT)
        body = assert_error(response, 503, "audit_unavailable")
        assert '"score"' not in json.dumps(body) and response.headers["retry-after"]
        batch = client.post(
            "/v1/predict/batch", data={"modality": "photo"}, files=[("files", ("a.png", DARK))]
        )
        assert_error(batch, 503, "audit_unavailable")


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


def test_audit_export_cli(client: TestClient, tmp_path: Path, capsys) -> None:
    ids = {predict(client, image_bytes(v)).json()["request_id"] for v in (0, 255)}
    out = tmp_path / "audit.csv"
    db = str(tmp_path / "audit.sqlite")
    assert (
        audit_main(["export", "--db", db, "--format", "csv", "--out", str(out), "--since", "2000-01-01"]) == 0
    )
    lines = out.read_text().splitlines()
    assert lines[0].startswith("request_id,created,station_id") and len(lines) == 3
    assert audit_main(["export", "--db", db, "--format", "jsonl", "--since", "2999-01-01"]) == 0
    assert capsys.readouterr().out == ""
    assert audit_main(["export", "--db", db]) == 0
    assert {json.loads(line)["request_id"] for line in capsys.readouterr().out.splitlines()} == ids
    with pytest.raises(ValueError, match="ISO 8601"):
        audit_main(["export", "--db", db, "--since", "yesterday"])


def test_openapi_documents_errors_and_examples(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    predict_op = schema["paths"]["/v1/predict"]["post"]
    assert {"400", "401", "403", "413", "415", "422", "503"} <= set(predict_op["responses"])
    assert "example" in schema["components"]["schemas"]["PredictionResult"]
    assert "/v2/models/{name}/infer" in schema["paths"]


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
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
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


def test_large_xray_scan_is_tiled(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, xray_tiling=True, tile_scale=1.0, max_tiles=40)
    scan = image_bytes(255, size=(200, 80), mode="L")  # 32 px tiles with overlap: several tiles
    with TestClient(create_app(settings)) as client:
        response = predict(client, scan, modality="xray", return_heatmap="true")
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["tiles"] > 1 and body["verdict"] == "counterfeit"
        assert Image.open(io.BytesIO(base64.b64decode(body["heatmap_png"]))).size == (200, 80)
        small = predict(client, image_bytes(255, size=(30, 20), mode="L"), modality="xray").json()
        assert small["tiles"] is None  # fits one tile: scored whole, through the batcher
        assert predict(client, image_bytes(0), modality="photo").json()["tiles"] is None
        huge = predict(client, image_bytes(0, size=(2000, 2000), mode="L"), modality="xray")
        assert_error(huge, 413, "too_many_tiles")


def test_settings_from_file_and_environment(tmp_path: Path, monkeypatch) -> None:
    from verity.api.settings import load_settings

    config = tmp_path / "verity.env"
    config.write_text("VERITY_MAX_BATCH_FILES=3\nVERITY_MODELS_DIR=/srv/models\n")
    monkeypatch.setenv("VERITY_MODELS_DIR", "/from/env")
    settings = load_settings(config)
    assert settings.max_batch_files == 3 and str(settings.models_dir) == "/from/env"  # env beats the file
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.env")


def test_serve_refuses_non_loopback_without_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    from verity.api.cli import is_loopback, serve_main

    monkeypatch.setenv("VERITY_KEYS_FILE", str(tmp_path / "keys.json"))
    assert serve_main(["--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to start" in capsys.readouterr().err
    assert serve_main(["--host", "127.0.0.1", "--require-api-keys"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")


def test_reload_under_load_never_fails_a_request(tmp_path: Path, models_dir: Path) -> None:
    import asyncio

    import httpx

    app = create_app(make_settings(tmp_path))

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:

                async def one():
                    return await client.post(
                        "/v1/predict", data={"modality": "photo"}, files={"file": ("a.png", DARK)}
                    )

                first = [asyncio.create_task(one()) for _ in range(12)]
                write_model(models_dir, "photo-test", "3", "photo")
                reload = asyncio.create_task(client.post("/v1/models/reload"))
                second = [asyncio.create_task(one()) for _ in range(12)]
                return await asyncio.gather(*first, *second), await reload

    responses, reload = asyncio.run(scenario())
    assert reload.json()["loaded"] == ["photo-test/3"]
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["model"]["version"] for r in responses} <= {"2", "3"}


def test_json_logs_carry_request_id() -> None:
    import logging

    from verity.api.logs import JsonFormatter, request_id_var

    token = request_id_var.set("abc123")
    try:
        record = logging.makeLogRecord(
            {
                "name": "verity.api",
                "levelno": 20,
                "levelname": "INFO",
                "msg": "scored %s",
                "args": ("x",),
                "verdict": "genuine",
                "color_message": "\x1b[1m",
            }
        )
        line = json.loads(JsonFormatter().format(record))
    finally:
        request_id_var.reset(token)
    assert line["request_id"] == "abc123" and line["message"] == "scored x" and line["verdict"] == "genuine"
    assert "color_message" not in line and line["level"] == "info"


def test_limit_malloc_arenas(monkeypatch) -> None:
    import platform

    from verity.api.cli import limit_malloc_arenas

    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert limit_malloc_arenas(0) is False
    applied = limit_malloc_arenas(4)
    assert applied is (platform.libc_ver()[0] == "glibc")
    import os

    assert os.environ["MALLOC_ARENA_MAX"] == "4"  # inherited by worker processes


def test_broken_key_file_keeps_previous_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.add("gate-1")
    assert store.verify(secret) is not None
    time.sleep(0.01)
    (tmp_path / "keys.json").write_text("{ this is not json")
    assert store.verify(secret) is not None  # still the keys it had, no exception
    assert store.verify("vk_x_y") is None


def test_no_route_dependency_runs_in_the_threadpool(tmp_path: Path) -> None:
    """FastAPI runs a plain `def` dependency in the threadpool: one thread hop per dependency per request.
    Every dependency of every route must be a coroutine (or an object with an async __call__)."""
    import inspect

    from fastapi.routing import APIRoute

    settings = Settings(
        models_dir=make_models_dir(tmp_path),
        audit_db=tmp_path / "a.sqlite",
        keys_file=tmp_path / "keys.json",
        background_load=False,
    )
    app = create_app(settings)

    def sync_dependencies(dependant) -> list[str]:  # noqa: ANN001 - fastapi Dependant
        found = []
        for sub in dependant.dependencies:
            call = sub.call
            is_async = inspect.iscoroutinefunction(call) or inspect.iscoroutinefunction(
                type(call).__call__
            )
            if not is_async:
                found.append(getattr(call, "__qualname__", repr(call)))
            found += sync_dependencies(sub)
        return found

    def api_routes(routes: list) -> list[APIRoute]:
        found = []
        for route in routes:
            if isinstance(route, APIRoute):
                found.append(route)
            elif hasattr(route, "original_router"):  # an included router (FastAPI >= 0.16x)
                found += api_routes(route.original_router.routes)
        return found

    routes = api_routes(app.routes)
    assert any(route.path == "/v1/predict" for route in routes)
    offenders = {route.path: sync_dependencies(route.dependant) for route in routes}
    assert not {path: names for path, names in offenders.items() if names}
