"""What the inspection console (issue 15) needs from the server besides its history: view_png (the
image as the model saw it, under the heatmap), its files served with their CSP and shipped in the wheel,
and the numbers a page shows from error details. The history itself: tests/test_history.py."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import (
    assert_error,
    build_wheel,
    image_bytes,
    make_settings,
    predict,
    write_model,
)
from fastapi.testclient import TestClient
from PIL import Image

from verity.api.app import FORM_OVERHEAD, _console_file, create_app
from verity.api.errors import ApiError
from verity.api.middleware import CONSOLE_CSP

REPO = Path(__file__).resolve().parents[1]


def auth(secret: str | None) -> dict[str, str] | None:
    return {"X-API-Key": secret} if secret else None


def history(client: TestClient, secret: str | None = None, **params: object):
    return client.get("/v1/history", params={k: str(v) for k, v in params.items()}, headers=auth(secret))


def png_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def sixteen_bit(width: int, height: int) -> bytes:
    """A 16-bit grey PNG holding 12-bit values (0..4095): a horizontal ramp."""
    ramp = np.tile(np.linspace(0, 4095, width).astype(np.uint16), (height, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def test_view_png_is_the_heatmaps_size_and_a_dim_xray_is_not_black(client: TestClient) -> None:
    photo = predict(client, image_bytes(200), return_view="true", return_heatmap="true").json()
    view, heat = png_of(photo["view_png"]), png_of(photo["heatmap_png"])
    assert view.dtype == np.uint8 and view.shape == heat.shape == (32, 32, 3)
    assert abs(int(view.mean()) - 200) <= 1  # a photo is shown as the model saw it, not stretched
    assert predict(client).json()["view_png"] is None  # only when asked for

    scan = sixteen_bit(48, 40)
    raw = np.asarray(Image.open(io.BytesIO(scan)))
    assert raw.max() == 4095 and int(raw.max()) >> 8 < 16  # shown as 8 bits naively: all near black
    xray = predict(client, scan, modality="xray", return_view="true", return_heatmap="true").json()
    view, heat = png_of(xray["view_png"]), png_of(xray["heatmap_png"])
    assert view.shape == heat.shape == (32, 32, 3)
    content = view[4:28]  # letterboxed 48x40 -> 32x27: the rows inside the air padding
    assert content.min() <= 10 and content.max() >= 245 and content.std() > 50
    assert np.all(view[0] == 255)  # the letterbox padding is air, white
    alone = predict(client, scan, modality="xray", return_view="true").json()
    assert alone["heatmap_png"] is None and np.array_equal(png_of(alone["view_png"]), view)

    batch = client.post(
        "/v1/predict/batch",
        files=[("files", ("a.png", scan, "image/png")), ("files", ("b.txt", b"not an image", "text/plain"))],
        data={"modality": "xray", "return_view": "true"},
    ).json()["results"]
    assert np.array_equal(png_of(batch[0]["result"]["view_png"]), view) and batch[1]["error"]


def test_view_png_of_a_tiled_scan(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, tile_scale=1.0, max_tiles=60)
    with TestClient(create_app(settings)) as client:
        answer = predict(
            client, sixteen_bit(600, 80), modality="xray", return_view="true", return_heatmap="true"
        )
        body = answer.json()
    assert body["tiles"] > 1
    view, heat = png_of(body["view_png"]), png_of(body["heatmap_png"])
    assert view.shape == heat.shape == (80, 600, 3)
    ramp = view[40, :, 0].astype(int)
    assert ramp[:20].mean() < 20 and ramp[-20:].mean() > 235 and np.all(np.diff(ramp) >= -2)


def console_files(root: Path) -> Path:
    folder = root / "console"
    (folder / "strings").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>Verity</title>")
    (folder / "app.js").write_text("export const ok = 1;")
    (folder / "style.css").write_text("body {}")
    (folder / "icon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "strings" / "ru.json").write_text("{}")
    (folder / ".secret.js").write_text("no")
    (folder / "tool.py").write_text("no")
    (root / "outside.js").write_text("no")
    return folder


def test_the_console_is_served_with_its_csp(tmp_path: Path, models_dir: Path, monkeypatch) -> None:
    folder = console_files(tmp_path / "pkg")
    monkeypatch.setattr("verity.api.app.console_dir", lambda: folder)
    settings = make_settings(tmp_path, require_api_keys=True)  # the page itself needs no key
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>Verity</title>" in page.text
        types = {
            "app.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8",
            "icon.svg": "image/svg+xml",
            "strings/ru.json": "application/json",
        }
        for name, media_type in types.items():
            response = client.get(f"/console/{name}")
            assert response.status_code == 200 and response.headers["content-type"] == media_type, name
        for response in (page, client.get("/console/app.js")):
            assert response.headers["content-security-policy"] == CONSOLE_CSP.decode()
            assert response.headers["permissions-policy"] == "camera=(self)"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in CONSOLE_CSP.decode() and "unsafe" not in CONSOLE_CSP.decode()
        for name in ("x.js", ".secret.js", "tool.py", "../outside.js", "%2e%2e/outside.js", "strings"):
            assert_error(client.get(f"/console/{name}"), 404)
        for name in ("../outside.js", "strings/../../outside.js", "/etc/passwd"):  # as the route gets them
            with pytest.raises(ApiError):
                _console_file(name)
        api = history(client)
        assert api.status_code == 401 and api.headers["cache-control"] == "no-store"
        assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert_error(client.get("/", headers={"Host": "evil.example"}), 400, "invalid_host")


def test_error_details_carry_the_numbers_a_page_shows(tmp_path: Path) -> None:
    write_model(tmp_path / "models", "photo-test", "1", "photo")  # no X-ray model: an X-ray is a 503
    settings = make_settings(tmp_path, max_upload_bytes=2048, rate_limit_per_s=0.5, rate_limit_burst=2)
    with TestClient(create_app(settings)) as client:
        body = client.post(
            "/v1/predict", content=b"x" * 100_000, headers={"content-type": "multipart/form-data"}
        )
        assert assert_error(body, 413, "request_too_large")["error"]["limit_bytes"] == 2048 + FORM_OVERHEAD
        large = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(large).save(buffer, format="PNG")
        assert len(buffer.getvalue()) > 2048
        file = assert_error(predict(client, buffer.getvalue()), 413, "image_too_large")
        assert file["error"]["limit_bytes"] == 2048
        unavailable = assert_error(predict(client, modality="xray"), 503, "no_model")
        assert unavailable["error"]["retry_after_s"] == settings.retry_after_s
        limited = assert_error(predict(client), 429, "rate_limited")
        assert limited["error"]["retry_after_s"] >= 1
        plain = assert_error(predict(client, b"not an image"), 429)  # still limited: no bytes number
        assert "limit_bytes" not in plain["error"]
    with TestClient(create_app(make_settings(tmp_path))) as client:
        refused = assert_error(predict(client, b"not an image"), 415)
        assert set(refused["error"]) == {"code", "message", "request_id"}
        assert set(assert_error(client.get("/v1/history/unknown"), 404)["error"]) == {
            "code",
            "message",
            "request_id",
        }


@pytest.mark.slow
def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    shipped = sorted(
        path.relative_to(REPO / "api").as_posix()
        for path in (REPO / "api" / "console").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    )
    assert "console/index.html" in shipped
    assert any("/" in name.removeprefix("console/") for name in shipped), "a subfolder's files ship too"
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    assert {f"verity/api/{name}" for name in shipped} <= names
