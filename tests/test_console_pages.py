"""The inspection console in a real browser: how the page is served (CSP, size), what an officer can
send it (drop, paste, camera, hostile names, files that are not images), its Russian and phone layouts,
and the whole flow by keyboard on `make serve`. Helpers and fixtures: tests/console_pages.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_fixtures import LiveServer
from console_fixtures import Sample, launch
from console_pages import Watch, blur, english_table, expect, keyboard_flow, upload, wait_done

pytestmark = pytest.mark.slow


# Latin words a Russian page may show: the product's name, units and acronyms, image formats, the key
# names on the keyboard, the key prefix, and the language switch's own name for English (a language is
# offered in its own name, so an English reader can find it on a Russian page).
ALLOWED_LATIN = {"verity", "id", "api", "jpeg", "png", "tiff", "dicom", "webp", "esc", "vk", "english",
                 "rkmen", "zbekcha"}  # the language menu's "Türkmençe" and "Oʻzbekcha", in their own script


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


def test_an_officers_whole_flow_by_keyboard_on_make_serve(
    new_page: Callable[..., tuple[Any, Watch]], served: LiveServer, samples: dict[str, Sample]
) -> None:
    page, watch = new_page(served)
    expect()(page.locator("#console")).to_be_visible()
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.className") == "skip-link"
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.id") == "verdict-panel"
    request_id = keyboard_flow(page, samples["genuine-photo"])
    record = httpx.get(f"{served.url}/v1/history/{request_id}", timeout=10).json()
    assert record["feedback"]["confirmed_label"] == "genuine"
    assert watch.unexpected_errors() == []

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
