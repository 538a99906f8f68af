"""/docs and /redoc render in a real browser with no request leaving the server (issue 13).

Debian's Chromium (/usr/bin/chromium; `.ci/run` installs it where missing) driven by Playwright, which
never downloads a browser of its own here. Every request the pages make is recorded: all must go to the
server's own origin, as on an air-gapped customs network where a CDN request would leave the page blank.
Without Chromium the tests fail in CI (`.ci/run` sets VERITY_CI and installs it) and are skipped
elsewhere with the command that installs it (console_fixtures.require_chromium).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from api_fixtures import LiveServer, server_env
from console_fixtures import CHROMIUM, CHROMIUM_ARGS, require_chromium

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    live = LiveServer(server_env(tmp_path_factory.mktemp("docs-offline"))).start()
    yield live
    live.stop()


def _render(server: LiveServer, path: str, rendered: str, screenshot: Path) -> tuple[list[str], list[str]]:
    """Opens the page, waits for the selector that shows it rendered; returns (requested URLs, errors)."""
    from playwright.sync_api import sync_playwright

    require_chromium()
    requests: list[str] = []
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.on("requestfailed", lambda request: errors.append(f"{request.url}: {request.failure}"))
            page.on("console", lambda note: errors.append(note.text) if note.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(server.url + path, wait_until="networkidle")
            page.wait_for_selector(rendered, timeout=20_000)
            page.screenshot(path=str(screenshot), full_page=False)
        finally:
            browser.close()
    return requests, errors


def test_swagger_ui_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    shot = tmp_path / "docs.png"
    # An operation of the API, drawn by Swagger UI from /openapi.json: the page works, not just loads.
    requests, errors = _render(server, "/docs", "#swagger-ui [data-path='/v1/predict']", shot)
    assert requests and all(url.startswith(server.url + "/") for url in requests), requests
    assert server.url + "/openapi.json" in requests
    assert server.url + "/docs/assets/swagger-ui-bundle.js" in requests
    assert errors == []  # nothing refused by the Content-Security-Policy, nothing failed
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_redoc_renders_offline(server: LiveServer, tmp_path: Path) -> None:
    """ReDoc's footer asks for the Redocly logo from its CDN: the page's Content-Security-Policy stops it in
    the browser (it never reaches the network, and ReDoc hides the image when it fails)."""
    shot = tmp_path / "redoc.png"
    requests, errors = _render(server, "/redoc", "h1 >> text=Verity", shot)
    own = (server.url + "/", "blob:" + server.url + "/")  # blob: a worker ReDoc makes from its own script
    foreign = [url for url in requests if not url.startswith(own)]
    assert server.url + "/docs/assets/redoc.standalone.js" in requests
    assert foreign == ["https://cdn.redoc.ly/redoc/logo-mini.svg"], foreign
    assert f"{foreign[0]}: csp" in errors  # failed as "csp": refused by the browser, never sent
    assert all(foreign[0] in error for error in errors), errors  # and nothing else went wrong
