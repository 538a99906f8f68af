"""Exposure, files and readiness (issue 13, items 5, 7 and 8).

/metrics behind a key when keys are required; /docs from local files and switchable; an anonymous caller
never admin; the Host header checked (DNS rebinding); security headers on every answer and no server
banner; the audit database, its WAL and stored images owner-only; "no model for photo in <dir>" instead
of "still loading" forever; an installed `verity serve` serving the shipped defaults from any folder.
The browser check of /docs offline is tests/test_docs_offline.py.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from api_fixtures import (
    DARK,
    LiveServer,
    admin_headers,
    assert_error,
    build_wheel,
    make_settings,
    predict,
    server_env,
    write_model,
)
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.auth import KeyStore
from verity.api.cli import _serving_environment
from verity.api.settings import LOOPBACK_HOSTS, Settings, default_models_dir

SECURITY = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def _keys(settings: Settings) -> tuple[str, str]:
    store = KeyStore(settings.keys_file)
    return store.add("gate-3")[1], store.add("hq", role="admin")[1]


# /metrics --------------------------------------------------------------------------------------------
def test_metrics_need_a_key_when_keys_are_required(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, require_api_keys=True)
    station, admin = _keys(settings)
    with TestClient(create_app(settings)) as client:
        predict(client, DARK, headers={"X-API-Key": station})
        body = assert_error(client.get("/metrics"), 401, "unauthorized")
        assert "verity_" not in str(body)
        assert_error(client.get("/metrics", headers={"X-API-Key": "vk_nope_nope"}), 401)
        for key in (station, admin):  # a scraper holds a station key: it needs no power to reload
            scraped = client.get("/metrics", headers={"Authorization": f"Bearer {key}"})
            assert scraped.status_code == 200 and 'verity_predictions_total{' in scraped.text


def test_metrics_open_on_an_unkeyed_loopback_server(client: TestClient) -> None:
    assert client.get("/metrics").status_code == 200


# Admin ------------------------------------------------------------------------------------------------
def test_anonymous_is_never_admin_even_unkeyed_on_loopback(client: TestClient, settings: Settings) -> None:
    station, admin = _keys(settings)
    refused = assert_error(client.post("/v1/models/reload"), 401, "unauthorized")
    assert "admin key" in refused["error"]["message"]
    assert_error(client.post("/v1/models/reload", headers={"X-API-Key": station}), 403, "forbidden")
    assert client.post("/v1/models/reload", headers={"X-API-Key": admin}).status_code == 200
    assert predict(client, DARK).status_code == 200  # what an unkeyed loopback server still allows


# Host check -------------------------------------------------------------------------------------------
def test_allowed_hosts_default_to_loopback_names() -> None:
    assert Settings().allowed_hosts == list(LOOPBACK_HOSTS) == ["localhost", "127.0.0.1", "[::1]"]


@pytest.fixture()
def loopback_client(tmp_path: Path, models_dir: Path) -> Iterator[TestClient]:
    """The app with the default allowed hosts, reached as 127.0.0.1."""
    settings = make_settings(tmp_path, allowed_hosts=list(LOOPBACK_HOSTS))
    with TestClient(create_app(settings), base_url="http://127.0.0.1:8000") as client:
        yield client


@pytest.mark.parametrize("host", ["127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]:8000", "localhost."])
def test_loopback_names_are_answered(loopback_client: TestClient, host: str) -> None:
    assert loopback_client.get("/v1/models", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize(
    "host", ["rebind.attacker.example", "127.0.0.1.nip.io", "localhost.attacker.example:8000", "[::2]", ""]
)
def test_a_foreign_host_gets_a_400_json(loopback_client: TestClient, settings: Settings, host: str) -> None:
    """DNS rebinding: a page on rebind.attacker.example, its name now resolving to 127.0.0.1, sends its
    own name as Host. It gets a 400 before any route runs, so it reloads nothing."""
    _, admin = _keys(settings)
    headers = {"Host": host, "X-API-Key": admin}
    started = time.perf_counter()
    body = assert_error(loopback_client.post("/v1/models/reload", headers=headers), 400, "invalid_host")
    assert time.perf_counter() - started < 1.0
    assert "VERITY_ALLOWED_HOSTS" in body["error"]["message"]
    oip = loopback_client.get("/v2/health/ready", headers={"Host": host})
    assert oip.status_code == 400 and set(oip.json()) == {"error"}
    assert loopback_client.get("/metrics").text.count('status="400"') >= 1


def test_a_long_host_is_not_echoed_whole(loopback_client: TestClient) -> None:
    body = assert_error(loopback_client.get("/healthz", headers={"Host": "a" * 5000}), 400, "invalid_host")
    assert len(body["error"]["message"]) < 300


def test_host_patterns(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, allowed_hosts="verity.customs.example, *.scan.customs.example")
    assert settings.allowed_hosts == ["verity.customs.example", "*.scan.customs.example"]
    with TestClient(create_app(settings)) as client:
        for host, status in [
            ("verity.customs.example", 200),
            ("gate-3.scan.customs.example:443", 200),
            ("scan.customs.example.attacker.example", 400),
            ("localhost", 400),  # a server given its names answers to those only
        ]:
            assert client.get("/healthz", headers={"Host": host}).status_code == status, host
    with TestClient(create_app(make_settings(tmp_path, allowed_hosts=["*"]))) as client:
        assert client.get("/healthz", headers={"Host": "anything.example"}).status_code == 200


def test_serve_adds_the_bound_address_to_the_allowed_hosts(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, allowed_hosts=list(LOOPBACK_HOSTS))

    def hosts(bind: str) -> list[str]:
        return _serving_environment(settings, bind)["VERITY_ALLOWED_HOSTS"].split(",")

    assert hosts("127.0.0.1") == list(LOOPBACK_HOSTS)
    assert hosts("10.20.0.7") == [*LOOPBACK_HOSTS, "10.20.0.7"]
    assert hosts("fd00::7") == [*LOOPBACK_HOSTS, "[fd00::7]"]
    assert hosts("0.0.0.0") == list(LOOPBACK_HOSTS)  # the names clients use are the operator's to give
    assert Settings(allowed_hosts=",".join(hosts("10.20.0.7"))).allowed_hosts == hosts("10.20.0.7")


# Security headers -------------------------------------------------------------------------------------
def _assert_security_headers(response: httpx.Response, no_store: bool = True) -> None:
    for name, value in SECURITY.items():
        assert response.headers.get(name) == value, (response.request.url, name)
    assert "frame-ancestors 'none'" in response.headers["content-security-policy"]
    assert (response.headers.get("cache-control") == "no-store") is no_store, response.request.url
    assert "server" not in response.headers


def test_security_headers_on_every_answer(client: TestClient) -> None:
    answers = [
        predict(client, DARK),  # 200
        client.get("/v1/models", headers={"X-API-Key": "vk_bad_key"}),  # 401
        client.get("/v1/nothing-here"),  # 404
        client.post("/v1/feedback", content=b"{" * (2 * 1024 * 1024),  # 413 from the body limit
                    headers={"content-type": "application/json"}),
        client.get("/healthz", headers={"Host": "rebind.attacker.example"}),  # 400 from the Host check
        client.post("/v2/models/photo-test/infer", content=b"not json"),  # a /v2 error
        client.get("/docs"),
    ]
    assert [a.status_code for a in answers[:5]] == [200, 401, 404, 413, 400]
    assert answers[5].status_code in (400, 415, 422)
    for answer in answers:
        _assert_security_headers(answer)
    assert answers[0].headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert "script-src 'self' 'unsafe-inline'" in answers[-1].headers["content-security-policy"]
    asset = client.get("/docs/assets/swagger-ui-bundle.js")
    _assert_security_headers(asset, no_store=False)  # static files of the docs may be cached


# Docs -------------------------------------------------------------------------------------------------
def test_docs_load_only_local_assets(client: TestClient) -> None:
    for page, assets in [
        ("/docs", ["/docs/assets/swagger-ui-bundle.js", "/docs/assets/swagger-ui.css"]),
        ("/redoc", ["/docs/assets/redoc.standalone.js"]),
    ]:
        html = client.get(page)
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        references = re.findall(r'(?:src|href|spec-url)="([^"]+)"|url: \'([^\']+)\'', html.text)
        references = [ref for pair in references for ref in pair if ref]
        assert references and all(ref.startswith("/") for ref in references), references
        assert "http://" not in html.text and "https://" not in html.text
        for asset in assets:
            answer = client.get(asset)
            assert answer.status_code == 200 and len(answer.content) > 100_000, asset
    assert '"openapi": "3.1' in client.get("/openapi.json").text.replace('":"', '": "')


def test_docs_can_be_turned_off(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, api_docs=False)
    with TestClient(create_app(settings)) as client:
        for path in ("/docs", "/redoc", "/openapi.json", "/docs/assets/swagger-ui-bundle.js"):
            assert_error(client.get(path), 404)
        assert predict(client, DARK).status_code == 200


# Files ------------------------------------------------------------------------------------------------
def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture()
def open_umask() -> Iterator[None]:
    """umask 0: the modes must come from the code, not from a careful umask."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


def test_audit_database_wal_and_images_are_owner_only(tmp_path: Path, models_dir: Path, open_umask) -> None:
    var = tmp_path / "var" / "verity"
    settings = make_settings(tmp_path, audit_db=var / "audit.sqlite", image_store_dir=var / "images")
    with TestClient(create_app(settings)) as client:
        assert predict(client, DARK).status_code == 200
        for name in ("audit.sqlite", "audit.sqlite-wal", "audit.sqlite-shm"):
            assert _mode(var / name) == 0o600, name
        images = list((var / "images").rglob("*.*"))
        assert images and all(_mode(p) == 0o600 for p in images), images
        assert {_mode(p.parent) for p in images} == {0o700}
    assert _mode(var / "images") == _mode(var) == _mode(tmp_path / "var") == 0o700
    assert not list((var / "images").rglob("*.tmp"))


def test_an_older_world_readable_database_is_tightened(tmp_path: Path, models_dir: Path) -> None:
    import sqlite3

    database = tmp_path / "audit.sqlite"
    sqlite3.connect(database).close()  # what the earlier versions did: 0644 under the usual umask
    os.chmod(database, 0o644)
    with TestClient(create_app(make_settings(tmp_path))) as client:
        assert predict(client, DARK).status_code == 200
    assert _mode(database) == 0o600


# Readiness --------------------------------------------------------------------------------------------
def test_no_model_says_which_modality_and_where(tmp_path: Path) -> None:
    empty = tmp_path / "nothing-here"
    empty.mkdir()
    with TestClient(create_app(make_settings(tmp_path, models_dir=empty))) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        body = ready.json()
        assert body["ready"] is False and body["models_dir"] == str(empty)
        assert f"No model for photo in {empty}" in body["message"]
        assert f"no model for xray in {empty}" in body["message"]
        assert "VERITY_MODELS_DIR" in body["message"] and "loading" not in body["message"]
        refused = assert_error(predict(client, DARK), 503, "no_model")
        assert refused["error"]["message"].startswith(f"No model for photo in {empty}")
        write_model(empty, "photo-test", "1", "photo")  # an admin adds a model and reloads
        assert client.post("/v1/models/reload", headers=admin_headers(client.app.state.settings)).json()["ok"]
        assert predict(client, DARK).status_code == 200
        half = client.get("/readyz")  # photo served, xray not: not ready until every modality has a model
        assert half.status_code == 503 and not half.json()["ready"]
        assert half.json()["message"].startswith(f"No model for xray in {empty}")


def test_a_relative_models_dir_is_shown_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with TestClient(create_app(make_settings(tmp_path, models_dir=Path("models")))) as client:
        assert client.get("/readyz").json()["models_dir"] == str(tmp_path / "models")


def test_still_loading_is_said_only_while_loading(tmp_path: Path, models_dir: Path) -> None:
    from verity.inference.engine import OnnxEngine

    def slow_engine(path: Path) -> OnnxEngine:
        time.sleep(0.5)
        return OnnxEngine(path, warmup=False)

    app = create_app(make_settings(tmp_path, background_load=True), engine_factory=slow_engine)
    with TestClient(app) as client:
        assert "still loading" in client.get("/readyz").json()["message"]
        assert_error(predict(client, DARK), 503, "not_ready")


def test_the_default_models_dir_does_not_depend_on_the_working_folder(tmp_path: Path, monkeypatch) -> None:
    """A working folder with its own checkpoints/ (where `verity train` writes) hides nothing: the
    default is the package's, where the shipped models are."""
    (tmp_path / "checkpoints").mkdir()
    monkeypatch.chdir(tmp_path)
    package = Path(__file__).resolve().parents[1] / "checkpoints"
    assert default_models_dir().resolve() == package == Settings().models_dir.resolve()
    assert (default_models_dir() / "photo-default" / "1.0.0" / "model.onnx").is_file()


# Installed elsewhere ----------------------------------------------------------------------------------
SHIPPED_FILES = ("model.onnx", "model.int8.onnx", "model.fp16.onnx", "card.json", "bank.npz", "profile.npz")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_an_installed_verity_serve_serves_the_shipped_defaults_from_any_folder(tmp_path: Path) -> None:
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n for n in names if n.startswith("verity/checkpoints/") and not n.endswith(".py"))
    assert shipped and all(n.rsplit("/", 1)[1] in SHIPPED_FILES for n in shipped), shipped
    assert "verity/checkpoints/photo-default/1.0.0/model.onnx" in shipped
    assert "verity/checkpoints/xray-default/1.1.0/model.onnx" in shipped
    size_mb = wheel.stat().st_size / 1e6
    assert size_mb < 40, size_mb  # the ONNX files only: the serve install stays under 300 MB
    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--quiet", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr
    elsewhere = tmp_path / "customs-it"  # no checkpoints/ here
    elsewhere.mkdir()
    server = LiveServer({**server_env(tmp_path / "state"), "PYTHONPATH": str(target)}, cwd=elsewhere)
    server.env.pop("VERITY_MODELS_DIR")  # unset: the default is what is tested
    server.start(timeout=180)
    try:
        ready = httpx.get(server.url + "/readyz").json()
        assert ready["ready"] and ready["defaults"] == {
            "photo": "photo-default/1.0.0", "xray": "xray-default/1.1.0"
        }, ready
        assert Path(ready["models_dir"]) == target / "verity" / "checkpoints"
        log = server.log_path.read_text()
        assert f"serving models from {target / 'verity' / 'checkpoints'}" in log
        form = {"files": {"file": ("a.png", DARK, "image/png")}, "data": {"modality": "photo"}}
        response = httpx.post(server.url + "/v1/predict", **form)
        assert response.status_code == 200, response.text
        _assert_security_headers(response)  # and no "server: uvicorn" from the live server
    finally:
        server.stop()


@pytest.mark.slow
def test_a_live_server_sends_no_banner_and_refuses_a_rebound_host(tmp_path: Path) -> None:
    server = LiveServer(server_env(tmp_path)).start()
    try:
        answer = httpx.get(server.url + "/healthz")
        assert answer.status_code == 200
        _assert_security_headers(answer)  # "server: uvicorn" was sent before
        # A page on rebind.attacker.example whose name now resolves to 127.0.0.1: no key needed on this
        # unkeyed loopback server, yet neither its reload (anonymous) nor any other request gets through.
        started = time.perf_counter()
        rebound = httpx.post(server.url + "/v1/models/reload", headers={"Host": "rebind.attacker.example"})
        assert time.perf_counter() - started < 1.0
        assert rebound.status_code == 400 and rebound.json()["error"]["code"] == "invalid_host"
        assert httpx.post(server.url + "/v1/models/reload").status_code == 401  # anonymous: never admin
        log = server.log_path.read_text()
        assert f"serving models from {tmp_path / 'models'}" in log
        assert "answering Host localhost,127.0.0.1,[::1] (VERITY_ALLOWED_HOSTS)" in log
    finally:
        server.stop()
