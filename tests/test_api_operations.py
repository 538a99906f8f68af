"""Running the API: model loading and reload, readiness, settings, logs, process setup, audit export."""

from __future__ import annotations

import gc
import json
import time
import weakref
from pathlib import Path

import pytest
from api_fixtures import (
    BRIGHT,
    DARK,
    admin_headers,
    assert_error,
    image_bytes,
    make_settings,
    predict,
    write_model,
)
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.cli import audit_main
from verity.api.lifecycle_cli import promote
from verity.api.settings import Settings


def test_reload_success_and_failure(client: TestClient, settings: Settings, models_dir: Path) -> None:
    admin = admin_headers(settings)
    before = predict(client, DARK).json()["model"]
    assert before == {"name": "photo-test", "version": "2"}
    write_model(models_dir, "photo-test", "10", "photo")
    report = client.post("/v1/models/reload", headers=admin).json()
    assert report["ok"] and report["loaded"] == ["photo-test/10"]
    assert sorted(report["kept"]) == ["photo-test/1", "photo-test/2", "xray-test/1"]
    # Loaded, but not live by itself: the first start made photo-test/2 the production alias.
    assert report["defaults"]["photo"] == "photo-test/2"
    promote(settings, client.app.state.audit, "photo-test", "10", "the tested one")
    report = client.post("/v1/models/reload", headers=admin).json()
    assert report["defaults"]["photo"] == "photo-test/10"
    assert predict(client, DARK).json()["model"]["version"] == "10"
    # A corrupt new version, and a corrupted existing one: both reported, the old ones keep serving.
    (models_dir / "photo-test" / "11").mkdir()
    (models_dir / "photo-test" / "11" / "model.onnx").write_bytes(b"\x08\x01garbage")
    truncated = (models_dir / "photo-test" / "1" / "model.onnx").read_bytes()[:200]
    (models_dir / "photo-test" / "10" / "model.onnx").write_bytes(truncated)
    failed = client.post("/v1/models/reload", headers=admin).json()
    assert not failed["ok"] and len(failed["failed"]) == 2
    assert failed["defaults"]["photo"] == "photo-test/10" and "photo-test/10" in failed["kept"]
    response = predict(client, BRIGHT)
    assert response.status_code == 200 and response.json()["model"]["version"] == "10"
    # Removing a version unloads it; the production version it replaced serves again, and the reload says so.
    for path in (models_dir / "photo-test").glob("1*/model.onnx"):
        path.unlink()
    report = client.post("/v1/models/reload", headers=admin).json()
    assert "photo-test/10" in report["unloaded"] and report["defaults"]["photo"] == "photo-test/2"
    assert any("serving the one before, photo-test/2" in failure["error"] for failure in report["failed"])


def test_loads_leave_the_collectors_scans_and_free_retired_models(tmp_path: Path, models_dir: Path) -> None:
    """What a load leaves is frozen out of the cyclic collector's full scans (registry.freeze_long_lived),
    as a server's settings have it, and a model a reload retires is still freed, cycles and all."""
    settings = make_settings(tmp_path, gc_freeze=True)
    admin = admin_headers(settings)
    gc.unfreeze()  # so the count below is this app's freeze (conftest unfreezes after each test)
    with TestClient(create_app(settings)) as client:
        assert gc.get_freeze_count() > 0
        write_model(models_dir, "photo-test", "10", "photo")
        assert client.post("/v1/models/reload", headers=admin).json()["loaded"] == ["photo-test/10"]
        served = client.app.state.registry.find("photo-test", "10")
        engine = weakref.ref(served.engine)
        del served
        (models_dir / "photo-test" / "10" / "model.onnx").unlink()
        assert client.post("/v1/models/reload", headers=admin).json()["unloaded"] == ["photo-test/10"]
        assert engine() is None
        assert predict(client, DARK).status_code == 200


def test_pinned_version(tmp_path: Path, models_dir: Path) -> None:
    with TestClient(create_app(make_settings(tmp_path, pinned_models={"photo": "photo-test/1"}))) as client:
        assert predict(client).json()["model"] == {"name": "photo-test", "version": "1"}


@pytest.mark.slow  # seconds of wall time: make test-fast stays under a minute
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


def test_reload_under_load_never_fails_a_request(settings: Settings, models_dir: Path) -> None:
    import asyncio

    import httpx

    app = create_app(settings)
    admin = admin_headers(settings)

    async def scenario():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:

                async def one():
                    return await client.post(
                        "/v1/predict", data={"modality": "photo"}, files={"file": ("a.png", DARK)}
                    )

                first = [asyncio.create_task(one()) for _ in range(12)]
                write_model(models_dir, "photo-test", "3", "photo")
                reload = asyncio.create_task(client.post("/v1/models/reload", headers=admin))
                second = [asyncio.create_task(one()) for _ in range(12)]
                return await asyncio.gather(*first, *second), await reload

    responses, reload = asyncio.run(scenario())
    assert reload.json()["loaded"] == ["photo-test/3"]
    assert all(r.status_code == 200 for r in responses)
    assert {r.json()["model"]["version"] for r in responses} <= {"2", "3"}


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


def test_settings_from_file_and_environment(tmp_path: Path, monkeypatch) -> None:
    from verity.api.settings import load_settings

    config = tmp_path / "verity.env"
    config.write_text("VERITY_MAX_BATCH_FILES=3\nVERITY_MODELS_DIR=/srv/models\n")
    monkeypatch.setenv("VERITY_MODELS_DIR", "/from/env")
    settings = load_settings(config)
    assert settings.max_batch_files == 3 and str(settings.models_dir) == "/from/env"  # env beats the file
    with pytest.raises(FileNotFoundError):
        load_settings(tmp_path / "missing.env")


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


def test_no_route_dependency_runs_in_the_threadpool(settings: Settings) -> None:
    """FastAPI runs a plain `def` dependency in the threadpool: one thread hop per dependency per request.
    Every dependency of every route must be a coroutine (or an object with an async __call__)."""
    import inspect

    from fastapi.routing import APIRoute

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
