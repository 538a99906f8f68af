"""The inspection console (issue 15) in a real browser: Debian's Chromium driven by Playwright.

Two servers: one started as `make serve` starts it (`verity serve --host 127.0.0.1 --port P`, the shipped
models, no keys) and one that requires keys (tiny models, two stations). Every request the pages make is
recorded and must stay on the server's origin; console errors fail the test, so a Content-Security-Policy
violation does too. No skip when Chromium is missing: the test fails and says how to install it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fixtures import DARK, LiveServer, image_bytes, server_env
from console_fixtures import Sample, launch, require_chromium, shipped_server, synthetic_samples

pytestmark = pytest.mark.slow

WAIT_MS = 30_000
UPLOAD_LIMIT = 200_000  # bytes, on the keys-required server
# Latin words a Russian page may show: the product's name, units and acronyms, image formats, the key
# names on the keyboard, the key prefix, and the language switch's own name for English (a language is
# offered in its own name, so an English reader can find it on a Russian page).
ALLOWED_LATIN = {"verity", "id", "api", "jpeg", "png", "tiff", "dicom", "webp", "esc", "vk", "english"}
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


# ---- Fixtures ----------------------------------------------------------------------------------------


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
    """Keys required; three stations (lane-a, lane-b, lane-c: revoked by its test) on the tiny models."""
    from verity.api.auth import KeyStore

    root = tmp_path_factory.mktemp("console-keyed")
    # A small upload limit, so a 413 is cheap to provoke.
    live = LiveServer(
        server_env(root, VERITY_REQUIRE_API_KEYS="true", VERITY_MAX_UPLOAD_BYTES=str(UPLOAD_LIMIT))
    )
    store = KeyStore(root / "keys.json")
    keys = {station: store.add(station)[1] for station in ("lane-a", "lane-b", "lane-c")}
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


# ---- On the server `make serve` starts -----------------------------------------------------------------


def test_the_page_shows_the_apis_verdict_for_each_file(
    verdict_page: tuple[Any, Watch], served: LiveServer, samples: dict[str, Sample]
) -> None:
    page, _ = verdict_page
    shown = {}
    for row in page.locator("#queue li").all():
        name = row.locator(".q-name").text_content()
        shown[name] = (
            row.locator(".q-status").get_attribute("data-state"),
            row.locator(".q-modality").text_content(),
        )
    expected = {s.name: api_state(served, s) for s in samples.values()}
    assert {name: state for name, (state, _) in shown.items()} == expected
    # The synthetic files are what they claim, and the shipped models say so.
    assert expected == {
        "genuine-photo.jpg": "genuine",
        "counterfeit-photo.jpg": "counterfeit",
        "xray-16bit.png": "counterfeit",
    }
    # The 16-bit PNG was recognised as an X-ray from its bytes.
    assert shown["xray-16bit.png"][1] == "X-ray" and shown["genuine-photo.jpg"][1] == "Photo"
    # Each verdict was announced to screen readers; the last one is still in the live region.
    expect()(page.locator("#announcer")).to_have_text(re.compile(r"^\S+\.(jpg|png): (Genuine|Counterfeit)$"))
    # The panel shows the selected one in words, with the score and both thresholds.
    page.locator("#queue .queue-item", has_text="genuine-photo.jpg").click()
    expect()(page.locator("#verdict-body .verdict-word")).to_have_attribute("data-state", "genuine")
    expect()(page.locator("#verdict-body .verdict-word .word")).to_have_text("Genuine")
    expect()(page.locator("#verdict-body .score-legend")).to_contain_text("clear at or below")
    expect()(page.locator("#verdict-details .model")).to_have_text(re.compile(r"^photo-default \S+$"))


def test_the_xray_is_shown_windowed_under_a_heatmap_of_its_size(verdict_page: tuple[Any, Watch]) -> None:
    page, _ = verdict_page
    page.locator("#queue .queue-item", has_text="xray-16bit.png").click()
    view = page.locator("#viewer .view-image")
    expect()(view).to_be_visible()
    assert view.get_attribute("src").startswith("data:image/png;base64,")
    sizes = page.evaluate(
        """() => {
            const [v, h] = [document.querySelector('.view-image'), document.querySelector('.heat-image')];
            const canvas = document.createElement('canvas');
            canvas.width = v.naturalWidth; canvas.height = v.naturalHeight;
            const context = canvas.getContext('2d');
            context.drawImage(v, 0, 0);
            const pixels = context.getImageData(0, 0, canvas.width, canvas.height).data;
            let low = 255, high = 0;
            for (let i = 0; i < pixels.length; i += 4) {
                low = Math.min(low, pixels[i]);
                high = Math.max(high, pixels[i]);
            }
            const box = (e) => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
            return {view: [v.naturalWidth, v.naturalHeight], heat: [h.naturalWidth, h.naturalHeight],
                    spread: high - low, viewBox: box(v), heatBox: box(h)};
        }"""
    )
    assert sizes["view"] == sizes["heat"] and sizes["view"][0] > 0
    assert sizes["viewBox"] == sizes["heatBox"]  # laid exactly over each other
    assert sizes["spread"] > 100  # windowed: not a black rectangle


def test_the_heatmap_toggles_and_follows_the_opacity_slider(verdict_page: tuple[Any, Watch]) -> None:
    page, _ = verdict_page
    page.locator("#queue .queue-item", has_text="counterfeit-photo.jpg").click()
    heat, toggle = page.locator("#viewer .heat-image"), page.locator("#viewer .heat-toggle")
    expect()(heat).to_be_visible()
    blur(page)
    page.keyboard.press("h")
    expect()(heat).to_be_hidden()
    expect()(toggle).to_have_attribute("aria-pressed", "false")
    toggle.click()
    expect()(heat).to_be_visible()
    page.locator("#heat-opacity").fill("20")
    assert heat.evaluate("e => getComputedStyle(e).opacity") == "0.2"
    blur(page)
    page.keyboard.press("]")
    assert heat.evaluate("e => getComputedStyle(e).opacity") == "0.3"
    page.keyboard.press("[")
    page.keyboard.press("[")
    assert heat.evaluate("e => getComputedStyle(e).opacity") == "0.1"
    # Zoom by key and button, pan by arrow keys on the focused image, back to fit.
    page.keyboard.press("+")
    frame = page.locator("#viewer .frame")
    assert frame.evaluate("e => e.style.getPropertyValue('--zoom')") == "1.5"
    page.locator("#viewer .stage").focus()
    page.keyboard.press("ArrowLeft")
    assert frame.evaluate("e => e.style.getPropertyValue('--pan-x')") != "0px"
    page.locator("#viewer .zoom-fit").click()
    assert frame.evaluate("e => e.style.getPropertyValue('--zoom')") == "1"


def test_a_large_scan_is_tiled_and_zooms(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    """A 4000 x 1500 16-bit scan (the synthetic one, repeated) is scored as tiles: the page says how many,
    as the API does, and shows the whole scan under its heatmap, which the wheel zooms into."""
    import io

    import numpy as np
    from PIL import Image

    from verity.datasets.synth import encode_png16

    scan = np.asarray(Image.open(io.BytesIO(samples["xray-16bit"].data))).astype(np.uint16)
    large = Sample(
        "scan-4000.png",
        encode_png16(np.ascontiguousarray(np.tile(scan, (6, 16))[:1500, :4000])),
        "image/png",
        "xray",
    )
    answer = httpx.post(
        served.url + "/v1/predict",
        files={"file": (large.name, large.data, large.mime)},
        data={"modality": "xray"},
        timeout=60,
    ).json()
    assert answer["tiles"] > 1
    page, watch = new_page(served)
    upload(page, [large])
    wait_done(page, 1)
    template = english_table(page)["viewer.tiles"]
    expect()(page.locator("#viewer .tiles")).to_have_text(template.replace("{count}", str(answer["tiles"])))
    sizes = page.evaluate(
        "() => Array.from(document.querySelectorAll('.frame img'), e => [e.naturalWidth, e.naturalHeight])"
    )
    assert sizes[0] == sizes[1] and max(sizes[0]) <= 2048 and sizes[0][0] > 2 * sizes[0][1]
    page.locator("#viewer .stage").hover()
    page.mouse.wheel(0, -300)
    frame = page.locator("#viewer .frame")
    assert float(frame.evaluate("e => e.style.getPropertyValue('--zoom')")) > 1
    assert watch.unexpected_errors() == []


def test_an_image_the_model_does_not_know_is_not_recognised(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer
) -> None:
    """A flat grey picture is no product: the API says recognised false, the page "Not recognised"."""
    flat = Sample("flat.png", image_bytes(128, size=(240, 200)), "image/png", "photo")
    assert api_state(served, flat) == "not_recognised"
    page, watch = new_page(served)
    upload(page, [flat])
    wait_done(page, 1)
    table = english_table(page)
    expect()(page.locator("#verdict-body .verdict-word")).to_have_attribute("data-state", "not_recognised")
    expect()(page.locator("#verdict-body .verdict-word .word")).to_have_text(table["verdict.not_recognised"])
    reasons = [table["reason.not_recognised"], table["reason.unlike_training"]]  # the cause after the word
    expect()(page.locator("#verdict-details .reasons li")).to_have_text(reasons)
    assert watch.unexpected_errors() == []


def test_a_feedback_key_records_the_outcome_on_the_server(
    verdict_page: tuple[Any, Watch], served: LiveServer
) -> None:
    page, _ = verdict_page
    page.locator("#queue .queue-item", has_text="counterfeit-photo.jpg").click()
    request_id = page.locator("#verdict-details .request-id").text_content()
    page.keyboard.press("n")  # the note field, then a shortcut key typed in it stays text
    page.keyboard.type("hologram missing; c and g typed here")
    page.keyboard.press("Escape")  # leaves the field: keys are shortcuts again
    page.keyboard.press("c")
    expect()(page.locator("#feedback-status")).to_have_text("Recorded: Confirmed counterfeit")
    record = httpx.get(f"{served.url}/v1/history/{request_id}", timeout=10).json()
    assert record["feedback"]["confirmed_label"] == "counterfeit"
    assert record["feedback"]["notes"] == "hologram missing; c and g typed here"
    row = page.locator(f"#history .history-row[data-request-id='{request_id}']")
    expect()(row.locator(".h-outcome")).to_have_text("Confirmed counterfeit")
    page.keyboard.press("u")  # cannot tell: the third label
    expect()(row.locator(".h-outcome")).to_have_text("Cannot tell")
    assert (
        httpx.get(f"{served.url}/v1/history/{request_id}", timeout=10).json()["feedback"]["confirmed_label"]
        == "unsure"
    )


def test_history_reopens_a_record_by_keyboard(verdict_page: tuple[Any, Watch]) -> None:
    page, _ = verdict_page
    rows = page.locator("#history .history-row")
    expect()(rows.first).to_be_visible()
    genuine = page.locator("#history .history-row[data-state=genuine]").first
    genuine.focus()
    page.keyboard.press("Enter")
    expect()(page.locator("#verdict-body .verdict-word")).to_have_attribute("data-state", "genuine")
    assert page.locator("#verdict-details .request-id").text_content() == genuine.get_attribute(
        "data-request-id"
    )
    page.locator("#history .history-verdict").select_option("counterfeit")
    expect()(page.locator("#history .history-row[data-state=genuine]")).to_have_count(0)
    expect()(page.locator("#history .history-row[data-state=counterfeit]").first).to_be_visible()
    page.locator("#history .history-verdict").select_option("")


def test_verdict_colours_meet_wcag_aa(verdict_page: tuple[Any, Watch]) -> None:
    page, _ = verdict_page
    word = page.locator("#verdict-body .verdict-word")
    expect()(word).to_be_visible()
    for state in ("genuine", "counterfeit", "uncertain", "not_recognised"):
        word.evaluate("(e, s) => { e.dataset.state = s; }", state)
        colours = word.evaluate("e => [getComputedStyle(e).color, getComputedStyle(e).backgroundColor]")
        assert contrast(*colours) >= 4.5, (state, colours)
    for selector in (
        "#verdict-body .verdict-hint",
        "#verdict-details .details dt",
        ".field span",
        "#choose",
        "h2",
    ):
        element = page.locator(selector).first
        colours = element.evaluate(
            """e => {
                let box = e;
                let bg = getComputedStyle(box).backgroundColor;
                while (bg === 'rgba(0, 0, 0, 0)' && box.parentElement) {  // transparent: the parent's shows
                    box = box.parentElement;
                    bg = getComputedStyle(box).backgroundColor;
                }
                return [getComputedStyle(e).color, bg];
            }"""
        )
        assert contrast(*colours) >= 4.5, (selector, colours)


def test_help_lists_the_shortcuts_and_no_console_errors_or_foreign_requests(
    verdict_page: tuple[Any, Watch], served: LiveServer
) -> None:
    page, watch = verdict_page
    blur(page)
    page.keyboard.press("?")
    help_dialog = page.locator("#help")
    expect()(help_dialog).to_be_visible()
    keys = help_dialog.locator("kbd").all_text_contents()
    assert {"o", "g", "c", "u", "n", "j", "k", "h", "[", "]", "?", "Esc"} <= set(keys)
    page.keyboard.press("g")  # shortcuts do not fire behind an open dialog
    page.keyboard.press("Escape")
    expect()(help_dialog).to_be_hidden()
    assert watch.requests and all(url.startswith(served.url + "/") for url in watch.requests), watch.requests
    assert watch.unexpected_errors() == []  # nothing refused by the CSP, nothing failed
    assert watch.dialogs == []


def test_the_console_is_served_with_a_strict_csp(served: LiveServer) -> None:
    page = httpx.get(served.url + "/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "frame-ancestors 'none'",
    ):
        assert directive in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    script = httpx.get(served.url + "/console/app.js", timeout=10)
    assert script.headers["content-type"].startswith("text/javascript")
    assert "content-security-policy" in script.headers
    # The markup itself holds no inline script or style for the CSP to refuse.
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text) and " style=" not in page.text


def test_the_first_load_is_at_most_250_kb(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer
) -> None:
    page, watch = new_page(served)
    expect()(page.locator("#console")).to_be_visible()
    sizes = watch.received
    assert served.url + "/console/app.js" in sizes and served.url + "/console/style.css" in sizes
    assert sum(sizes.values()) <= 250_000, sizes


def test_a_hostile_file_name_is_shown_as_text(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    page, watch = new_page(served)
    name = "<img src=x onerror=alert(1)>.jpg"
    station = "<b onmouseover=alert(2)>lane</b>"
    page.locator("#station").fill(station)  # sent as the station: the server has no keys
    page.locator("#case").fill("<i>SEZ-1</i>")
    genuine = samples["genuine-photo"]
    page.set_input_files("#file-input", [{"name": name, "mimeType": "image/jpeg", "buffer": genuine.data}])
    wait_done(page, 1)
    assert page.locator("#queue .q-name").text_content() == name
    details = page.locator("#verdict-details")
    expect()(details.locator(".file-name")).to_have_text(name)
    expect()(details).to_contain_text(station)
    expect()(page.locator("#history .h-case").first).to_have_text("<i>SEZ-1</i>")
    assert page.locator("img[src=x], b, i").count() == 0
    page.locator("#verdict-details dd", has_text="lane").hover()
    page.wait_for_timeout(300)  # an onerror or onmouseover handler would have fired by now
    assert watch.dialogs == []
    assert watch.unexpected_errors() == []
    # The fields are remembered for the tab, and only in sessionStorage.
    page.reload(wait_until="networkidle")
    expect()(page.locator("#station")).to_have_value(station)
    expect()(page.locator("#case")).to_have_value("<i>SEZ-1</i>")
    assert page.evaluate("() => localStorage.length") == 0


def test_drop_and_paste_queue_files_and_the_modality_comes_from_the_bytes(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    import io

    from PIL import Image

    page, watch = new_page(served)
    expect()(page.locator("#console")).to_be_visible()

    def encoded(mode: str, fmt: str) -> bytes:
        buffer = io.BytesIO()
        Image.new(mode, (40, 30), 1000 if mode == "I;16" else 90).save(buffer, format=fmt)
        return buffer.getvalue()

    dicom = bytes(128) + b"DICM" + bytes(64)
    cases = {
        "dicom": (dicom, "xray"),
        "tiff16": (encoded("I;16", "TIFF"), "xray"),
        "tiff8": (encoded("L", "TIFF"), "photo"),
        "png16": (encoded("I;16", "PNG"), "xray"),
        "png8": (encoded("L", "PNG"), "photo"),
        "jpeg": (samples["genuine-photo"].data, "photo"),
    }
    inferred = page.evaluate(
        """async (cases) => {
            const { inferModality } = await import('/console/sniff.js');
            const out = {};
            for (const [name, bytes] of Object.entries(cases)) {
                out[name] = await inferModality(new File([new Uint8Array(bytes)], 'no-extension'));
            }
            return out;
        }""",
        {name: list(data) for name, (data, _) in cases.items()},
    )
    assert inferred == {name: modality for name, (_, modality) in cases.items()}
    # Drop a file on the zone, then paste one: both are queued and answered.
    transfer = """(args) => {
        const transfer = new DataTransfer();
        transfer.items.add(new File([new Uint8Array(args.bytes)], args.name, { type: 'image/jpeg' }));
        return transfer;
    }"""
    data = list(samples["genuine-photo"].data)
    dropped = page.evaluate_handle(transfer, {"bytes": data, "name": "dropped.jpg"})
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dropped})
    pasted = page.evaluate_handle(transfer, {"bytes": data, "name": "pasted.jpg"})
    page.evaluate(
        "(t) => document.dispatchEvent(new ClipboardEvent('paste', { clipboardData: t, bubbles: true }))",
        pasted,
    )
    wait_done(page, 2)
    assert sorted(page.locator("#queue .q-name").all_text_contents()) == ["dropped.jpg", "pasted.jpg"]
    expect()(page.locator("#queue li[data-state=done]")).to_have_count(2)
    assert watch.unexpected_errors() == []


def test_a_text_file_named_jpg_gets_a_readable_error(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer
) -> None:
    page, watch = new_page(served)
    page.set_input_files(
        "#file-input",
        [{"name": "x.jpg", "mimeType": "image/jpeg", "buffer": b"Not a picture, only words.\n" * 4}],
    )
    wait_done(page, 1)
    message = english_table(page)["error.not_image"]
    expect()(page.locator("#queue li[data-state=error] .q-error")).to_have_text(message)
    expect()(page.locator("#verdict-body .verdict-error")).to_have_text(message)
    assert watch.unexpected_errors(allowed_statuses=(415,)) == []


def _latin_words(text: str) -> set[str]:
    return {word.lower() for word in re.findall(r"[A-Za-z]{2,}", text)}


def _page_text(page: Any) -> str:
    """All visible text, and every title, aria-label, placeholder and alt, of the page as it is now."""
    return page.evaluate(
        """() => {
            const parts = [document.title, document.body.innerText];
            for (const e of document.querySelectorAll('[title], [aria-label], [placeholder], [alt]')) {
                for (const a of ['title', 'aria-label', 'placeholder', 'alt']) {
                    if (e.hasAttribute(a)) parts.push(e.getAttribute(a));
                }
            }
            return parts.join('\\n');
        }"""
    )


def test_the_russian_page_has_no_english_left(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    page, watch = new_page(served, locale="ru-RU")
    assert page.evaluate("() => document.documentElement.lang") == "ru"
    russian_table = page.evaluate("async () => (await import('/console/strings/ru.js')).default")
    assert set(russian_table) == set(english_table(page))  # one table per language, the same keys
    english = set().union(*(_latin_words(text) for text in english_table(page).values())) - ALLOWED_LATIN
    texts = [_page_text(page)]
    upload(page, [samples["counterfeit-photo"], samples["xray-16bit"]])
    wait_done(page, 2)
    expect()(page.locator("#verdict-body .verdict-word")).to_be_visible()
    texts.append(_page_text(page))
    blur(page)
    page.keyboard.press("?")
    expect()(page.locator("#help")).to_be_visible()
    texts.append(_page_text(page))
    page.keyboard.press("Escape")
    # The data the page shows as it is (file names, model names, request ids) is not its language.
    data = [s.name for s in samples.values()]
    data += page.locator("#verdict-details .model").all_text_contents()
    data += page.locator(".request-id").all_text_contents()
    data += page.locator("#history .h-case, #history .h-product").all_text_contents()  # other tests' cases
    data += [
        f"{m['name']} {m['version']}"
        for m in httpx.get(served.url + "/v1/models", timeout=10).json()["models"]
    ]
    text = "\n".join(texts)
    for value in sorted({value for value in data if value.strip()}, key=len, reverse=True):
        text = text.replace(value, " ")
    left = _latin_words(text) - ALLOWED_LATIN
    assert left & english == set(), sorted(left & english)
    assert "Контрафакт" in text and "Рентген" in text
    # And the switch: English again, re-rendered in place.
    page.locator("#language").select_option("en")
    expect()(page.locator("#verdict-body .verdict-word .word")).to_have_text("Counterfeit")
    assert page.evaluate("() => document.documentElement.lang") == "en"
    assert watch.unexpected_errors() == []


def test_the_phone_layout_is_one_column_with_the_camera(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer
) -> None:
    page, _ = new_page(served, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    expect()(page.locator("#capture")).to_be_visible()
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    boxes = [
        page.locator(selector).bounding_box()
        for selector in (".submit", "#verdict-panel", "#viewer", "#details-panel", "#history")
    ]
    assert all(box["x"] < 20 and box["width"] > 340 for box in boxes), boxes  # stacked, full width
    assert [box["y"] for box in boxes] == sorted(box["y"] for box in boxes)
    height = page.locator("#choose").bounding_box()["height"]
    assert height >= 44  # a thumb's target


def _keyboard_flow(page: Any, sample: Sample) -> str:
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


def test_an_officers_whole_flow_by_keyboard_on_make_serve(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    page, watch = new_page(served)
    expect()(page.locator("#console")).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "verdict-panel"
    request_id = _keyboard_flow(page, samples["genuine-photo"])
    record = httpx.get(f"{served.url}/v1/history/{request_id}", timeout=10).json()
    assert record["feedback"]["confirmed_label"] == "genuine"
    assert watch.unexpected_errors() == []


def test_an_officers_whole_flow_by_keyboard_with_a_key(
    new_page: Callable[..., tuple[Any, Watch]], keyed: KeyedServer, samples: dict[str, Sample]
) -> None:
    page, watch = new_page(keyed.live)
    key_field = page.locator("#signin-key")
    expect()(key_field).to_be_focused()
    page.keyboard.type("vk_wrong_key")
    page.keyboard.press("Enter")
    expect()(page.locator("#signin-message")).to_have_text(
        "The server refused this key: it is unknown or revoked."
    )
    page.keyboard.press("Control+A")
    page.keyboard.type(keyed.keys["lane-a"])
    page.keyboard.press("Enter")
    expect()(page.locator("#console")).to_be_visible()
    expect()(page.locator("#station-field")).to_be_hidden()  # the key names the station
    assert page.evaluate("() => Object.keys(localStorage).length") == 0
    assert keyed.keys["lane-a"] not in page.url
    request_id = _keyboard_flow(page, samples["genuine-photo"])
    mine = {"X-API-Key": keyed.keys["lane-a"]}
    record = httpx.get(f"{keyed.live.url}/v1/history/{request_id}", headers=mine, timeout=10).json()
    assert record["station_id"] == "lane-a" and record["feedback"]["confirmed_label"] == "genuine"
    page.locator("#signout").focus()
    page.keyboard.press("Enter")
    expect()(key_field).to_be_visible()
    assert page.evaluate("() => sessionStorage.getItem('verity.key')") is None
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []


def _predict_as(keyed: KeyedServer, station: str, sample: Sample, case: str) -> None:
    answer = httpx.post(
        keyed.live.url + "/v1/predict",
        files={"file": (sample.name, sample.data, sample.mime)},
        data={"modality": "photo", "case_id": case},
        headers={"X-API-Key": keyed.keys[station]},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text


def test_history_shows_this_stations_records_only_a_page_at_a_time(
    new_page: Callable[..., tuple[Any, Watch]], keyed: KeyedServer, samples: dict[str, Sample]
) -> None:
    sample = samples["genuine-photo"]
    _predict_as(keyed, "lane-a", sample, "CASE-OF-LANE-A")
    for index in range(21):
        _predict_as(keyed, "lane-b", sample, f"LANE-B-{index:02d}")
    _predict_as(keyed, "lane-b", sample, "CASE-OF-LANE-B")  # the newest: first on the first page
    page, watch = new_page(keyed.live)
    sign_in(page, keyed.keys["lane-b"])
    rows = page.locator("#history .history-row")
    expect()(rows).to_have_count(20)
    first = rows.locator(".h-case").all_text_contents()
    assert first[0] == "CASE-OF-LANE-B" and first[1:] == [f"LANE-B-{i:02d}" for i in range(20, 1, -1)]
    page.locator("#history .history-older").click()
    expect()(rows).to_have_count(2)
    assert rows.locator(".h-case").all_text_contents() == ["LANE-B-01", "LANE-B-00"]
    expect()(page.locator("#history .history-older")).to_be_disabled()
    page.locator("#history .history-newer").click()
    expect()(rows).to_have_count(20)
    # lane-a's record is on neither page; a date range after today holds nothing.
    assert "CASE-OF-LANE-A" not in first
    tomorrow = page.evaluate("() => new Date(Date.now() + 86400000).toISOString().slice(0, 10)")
    page.locator("#history .history-since").fill(tomorrow)
    expect()(rows).to_have_count(0)
    expect()(page.locator("#history .history-status")).to_have_text("No records match.")
    page.locator("#history .history-since").fill("")
    expect()(rows).to_have_count(20)
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []


def test_a_revoked_key_goes_back_to_sign_in(
    new_page: Callable[..., tuple[Any, Watch]], keyed: KeyedServer
) -> None:
    from verity.api.auth import KeyStore

    page, watch = new_page(keyed.live)
    sign_in(page, keyed.keys["lane-c"])
    store = KeyStore(keyed.keys_file)
    (key_id,) = [k.key_id for k in store.list_keys() if k.station_id == "lane-c"]
    store.revoke(key_id)
    page.locator("#history .history-refresh").click()
    expect()(page.locator("#signin-key")).to_be_visible()
    expect()(page.locator("#signin-message")).to_have_text("The server refused your key. Sign in again.")
    expect()(page.locator("#console")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('verity.key')") is None
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []


def sign_in(page: Any, key: str) -> None:
    page.locator("#signin-key").fill(key)
    page.keyboard.press("Enter")
    expect()(page.locator("#console")).to_be_visible()


def test_too_large_busy_and_unreachable_each_say_what_to_do(
    new_page: Callable[..., tuple[Any, Watch]], keyed: KeyedServer
) -> None:
    page, _ = new_page(keyed.live)
    sign_in(page, keyed.keys["lane-a"])
    table = english_table(page)
    big = b"\xff\xd8\xff" + bytes(400_000)
    refused = httpx.post(
        keyed.live.url + "/v1/predict",
        files={"file": ("big.jpg", big, "image/jpeg")},
        data={"modality": "photo"},
        headers={"X-API-Key": keyed.keys["lane-a"]},
        timeout=60,
    )
    assert refused.status_code == 413, refused.text
    megabytes = page.evaluate(
        "(n) => new Intl.NumberFormat('en-GB', {maximumSignificantDigits: 2}).format(n / 1048576)",
        refused.json()["error"]["limit_bytes"],
    )
    expected_413 = table["error.too_large"].replace("{mb}", megabytes)
    assert megabytes in {"0.25", "0.19"}  # the 200,000-byte limit, with or without the form's allowance
    page.set_input_files("#file-input", [{"name": "big.jpg", "mimeType": "image/jpeg", "buffer": big}])
    wait_done(page, 1)
    expect()(page.locator("#queue li").nth(0).locator(".q-error")).to_have_text(expected_413)
    # Busy and unreachable, as a proxy or a dead link would answer: the page's own handling of them.
    answers = iter(["busy", "down"])

    def answer(route: Any) -> None:
        if next(answers) == "busy":
            body = {
                "error": {
                    "code": "queue_full",
                    "message": "at capacity",
                    "request_id": "r",
                    "retry_after_s": 7,
                }
            }
            route.fulfill(status=503, json=body, headers={"Retry-After": "7"})
        else:
            route.abort("connectionrefused")

    page.route("**/v1/predict", answer)
    upload(
        page,
        [
            Sample("one.png", DARK, "image/png", "photo"),
            Sample("two.png", DARK, "image/png", "photo"),
        ],
    )
    wait_done(page, 3)
    errors = page.locator("#queue li[data-state=error] .q-error").all_text_contents()
    assert table["error.busy"].replace("{seconds}", "7") in errors
    assert table["error.unreachable"] in errors
    # Retry, with the server reachable again: the same item ends in a verdict.
    page.unroute("**/v1/predict")
    page.locator("#queue li", has_text="two.png").locator(".q-retry").click()
    expect()(page.locator("#queue li[data-state=done]")).to_have_count(1, timeout=WAIT_MS)


def test_the_live_camera_takes_a_photo_into_the_queue(playwright: Any, served: LiveServer) -> None:
    """getUserMedia on Chromium's fake camera (a test pattern): Camera, then Capture, queues a JPEG."""
    chromium = launch(playwright, ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])
    try:
        page = chromium.new_context(permissions=["camera"]).new_page()
        errors: list[str] = []
        page.on("console", lambda note: errors.append(note.text) if note.type == "error" else None)
        page.goto(served.url + "/", wait_until="networkidle")
        page.locator("#camera").click()
        expect()(page.locator("#camera-snap")).to_be_enabled(timeout=10_000)
        page.wait_for_timeout(300)  # a first frame
        page.locator("#camera-snap").click()
        expect()(page.locator("#camera-dialog")).to_be_hidden()
        wait_done(page, 1)
        assert re.fullmatch(r"camera-[\dTZ-]+\.jpg", page.locator("#queue .q-name").text_content())
        expect()(page.locator("#queue li[data-state=done]")).to_have_count(1)
        assert errors == []
    finally:
        chromium.close()


def test_a_missing_chromium_fails_in_ci_and_is_skipped_plainly_elsewhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import console_fixtures

    monkeypatch.setattr(console_fixtures, "CHROMIUM", tmp_path / "no-chromium")
    monkeypatch.setenv("VERITY_CI", "1")
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y chromium"):
        console_fixtures.require_chromium()
    monkeypatch.delenv("VERITY_CI")
    with pytest.raises(pytest.skip.Exception, match="browser tests skipped"):
        console_fixtures.require_chromium()
