"""The console's browser tests' helpers and fixtures (tests/test_console*.py), loaded by conftest.py as a
pytest plugin: a page with every request and console message watched, the servers the tests run
against, and the steps several tests share.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fixtures import LiveServer, server_env
from console_fixtures import Sample, launch, require_chromium, shipped_server, synthetic_samples

WAIT_MS = 30_000
UPLOAD_LIMIT = 200_000  # bytes, on the keys-required server
# What `verity compare` found for photo-test 1 against production, in the figures the admin panel shows.
STORED_COMPARISON = {
    "images": 120,
    "roc_auc_difference": -0.041,
    "roc_auc_difference_interval": [-0.07, -0.012],
    "confidence": 0.95,
    "verdict_changes": 0.1,
    "worse_beyond_noise": True,
    "better_beyond_noise": False,
}
FAILED_LOAD = re.compile(r"^Failed to load resource: the server responded with a status of (\d{3})")


@dataclass
class Watch:
    """What one page did: requests, console errors, uncaught exceptions and dialogs."""

    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)
    received: dict[str, int] = field(default_factory=dict)  # URL -> bytes of its response body

    def unexpected_errors(self, allowed_statuses: tuple[int, ...] = ()) -> list[str]:
        """Console errors, less the browser's own note of an HTTP status this test provoked on purpose."""
        kept = []
        for error in self.errors:
            match = FAILED_LOAD.match(error)
            if match and int(match.group(1)) in allowed_statuses:
                continue
            kept.append(error)
        return kept


def open_page(
    browser: Any,
    server: LiveServer,
    locale: str = "en-GB",
    viewport: dict[str, int] | None = None,
    **options: Any,
) -> tuple[Any, Watch]:
    """A page in a fresh context (its own sessionStorage) at the console, with everything it does watched.
    The caller closes it: `with closing(page.context)` or a fixture's teardown."""
    context = browser.new_context(
        locale=locale, viewport=viewport or {"width": 1366, "height": 768}, **options
    )
    page = context.new_page()
    watch = Watch()
    page.on("request", lambda request: watch.requests.append(request.url))
    page.on("response", lambda response: watch.received.__setitem__(response.url, len(response.body())))
    page.on("requestfailed", lambda request: watch.errors.append(f"{request.url}: {request.failure}"))
    page.on("console", lambda note: watch.errors.append(note.text) if note.type == "error" else None)
    page.on("pageerror", lambda error: watch.errors.append(f"pageerror: {error}"))

    def on_dialog(dialog: Any) -> None:
        watch.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    # A listener from the start turns on Playwright's file chooser interception before any key opens
    # one; enabled only by expect_file_chooser, it can lose the race with a fast `o`.
    page.on("filechooser", lambda chooser: None)
    page.goto(server.url + "/", wait_until="networkidle")
    return page, watch


def expect() -> Any:
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect


def blur(page: Any) -> None:
    """Nothing focused: keys go to the document, as after a click on the page's background."""
    page.evaluate("() => document.activeElement && document.activeElement.blur()")


def english_table(page: Any) -> dict[str, str]:
    # evaluate goes through the DevTools protocol, so the page's CSP (no eval) does not stop it.
    return page.evaluate("async () => (await import('/console/strings/en.js')).default")


def upload(page: Any, samples: list[Sample]) -> None:
    page.set_input_files(
        "#file-input", [{"name": s.name, "mimeType": s.mime, "buffer": s.data} for s in samples]
    )


def wait_done(page: Any, count: int) -> None:
    expect()(page.locator("#queue li[data-state=done], #queue li[data-state=error]")).to_have_count(
        count, timeout=WAIT_MS
    )


def api_state(server: LiveServer, sample: Sample, headers: dict[str, str] | None = None) -> str:
    """The verdict the page must show for these bytes, from a direct API call."""
    answer = httpx.post(
        server.url + "/v1/predict",
        files={"file": (sample.name, sample.data, sample.mime)},
        data={"modality": sample.modality},
        headers=headers,
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    return "not_recognised" if body["recognised"] is False else body["verdict"]


def relative_luminance(rgb: tuple[float, ...]) -> float:
    def channel(value: float) -> float:
        value /= 255
        return value / 12.92 if value <= 0.04045 else ((value + 0.055) / 1.055) ** 2.4

    r, g, b = (channel(v) for v in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(foreground: str, background: str) -> float:
    def parse(css: str) -> tuple[float, ...]:
        numbers = [float(n) for n in re.findall(r"[\d.]+", css)]
        assert len(numbers) == 3 or (len(numbers) == 4 and numbers[3] == 1), css  # opaque colours only
        return tuple(numbers[:3])

    lighter, darker = sorted((relative_luminance(parse(foreground)), relative_luminance(parse(background))))
    return (darker + 0.05) / (lighter + 0.05)


# ---- Fixtures (module-scoped: each test module starts its own servers and browser) -----------------


@pytest.fixture(scope="module")
def samples(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Sample]:
    return synthetic_samples(tmp_path_factory.mktemp("console-samples"))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """As `make serve`: shipped models, loopback, no keys."""
    live = shipped_server(tmp_path_factory.mktemp("console-serve"))
    yield live
    live.stop()


@dataclass
class KeyedServer:
    live: LiveServer
    keys: dict[str, str]  # station -> secret
    keys_file: Path


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KeyedServer]:
    """Keys required; three stations (lane-a, lane-b, lane-c: revoked by its test) and an admin (hq) on the
    tiny models, photo-test 1 carrying a comparison against production (2) as `verity retrain` writes it."""
    from verity.api.auth import KeyStore

    root = tmp_path_factory.mktemp("console-keyed")
    # A small upload limit, so a 413 is cheap to provoke.
    env = server_env(root, VERITY_REQUIRE_API_KEYS="true", VERITY_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    live = LiveServer(env)
    (Path(env["VERITY_MODELS_DIR"]) / "photo-test" / "1" / "compare.json").write_text(
        json.dumps(STORED_COMPARISON), encoding="utf-8"
    )
    store = KeyStore(root / "keys.json")
    keys = {station: store.add(station)[1] for station in ("lane-a", "lane-b", "lane-c")}
    keys["hq"] = store.add("hq", role="admin")[1]
    live.start()
    yield KeyedServer(live, keys, root / "keys.json")
    live.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Any]:
    require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as running:
        yield running


@pytest.fixture(scope="module")
def browser(playwright: Any) -> Iterator[Any]:
    chromium = launch(playwright)
    yield chromium
    chromium.close()


@pytest.fixture()
def new_page(browser: Any) -> Iterator[Callable[..., tuple[Any, Watch]]]:
    """open_page on the module's browser; every context it opened is closed after the test, pass or fail."""
    pages: list[Any] = []

    def opener(server: LiveServer, **options: Any) -> tuple[Any, Watch]:
        page, watch = open_page(browser, server, **options)
        pages.append(page)
        return page, watch

    yield opener
    for page in pages:
        page.context.close()


@pytest.fixture(scope="module")
def verdict_page(browser: Any, served: LiveServer, samples: dict[str, Sample]) -> Iterator[tuple[Any, Watch]]:
    """One page on the `make serve` server that has received the three synthetic files."""
    page, watch = open_page(browser, served)
    expect()(page.locator("#console")).to_be_visible()
    upload(page, list(samples.values()))
    wait_done(page, 3)
    yield page, watch
    page.context.close()


def keyboard_flow(page: Any, sample: Sample) -> str:
    """Upload by `o`, wait for the verdict, confirm by `g`: keys only. Returns the request id."""
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("o")
    chooser.value.set_files([{"name": sample.name, "mimeType": sample.mime, "buffer": sample.data}])
    wait_done(page, 1)
    expect()(page.locator("#verdict-body .verdict-word")).to_be_visible()
    page.keyboard.press("g")
    expect()(page.locator("#feedback-status")).to_have_text("Recorded: Confirmed genuine")
    request_id = page.locator("#verdict-details .request-id").text_content()
    row = page.locator(f"#history .history-row[data-request-id='{request_id}']")
    expect()(row.locator(".h-outcome")).to_have_text("Confirmed genuine")
    return request_id


def sign_in(page: Any, key: str) -> None:
    page.locator("#signin-key").fill(key)
    page.keyboard.press("Enter")
    expect()(page.locator("#console")).to_be_visible()
