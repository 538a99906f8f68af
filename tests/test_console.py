"""The inspection console (issue 15) in a real browser: Debian's Chromium driven by Playwright.

Two servers: one started as `make serve` starts it (`verity serve --host 127.0.0.1 --port P`, the shipped
models, no keys) and one that requires keys (tiny models, two stations). Every request the pages make is
recorded and must stay on the server's origin; console errors fail the test, so a Content-Security-Policy
violation does too. No skip when Chromium is missing: the test fails and says how to install it.

This module: the verdict page on the server `make serve` starts. test_console_pages.py: how the page is
served, what an officer can send it, its languages and layouts; test_console_keys.py: a keys-required
server. Helpers and fixtures: tests/console_pages.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_fixtures import LiveServer, image_bytes
from console_fixtures import Sample
from console_pages import Watch, api_state, blur, contrast, english_table, expect, upload, wait_done

pytestmark = pytest.mark.slow


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
    # Which version answered, and that it is the promoted one (the first start made it production).
    promoted = re.compile(r"^photo-default \S+ \(production\)$")
    expect()(page.locator("#verdict-details .model")).to_have_text(promoted)


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
    """A flat grey picture is no product: the API says recognised false, the page "Not recognised", and
    why: grey, to a photo model that saw only colour, it is another kind of image (an X-ray sent as photo)."""
    flat = Sample("flat.png", image_bytes(128, size=(240, 200)), "image/png", "photo")
    assert api_state(served, flat) == "not_recognised"
    page, watch = new_page(served)
    upload(page, [flat])
    wait_done(page, 1)
    table = english_table(page)
    expect()(page.locator("#verdict-body .verdict-word")).to_have_attribute("data-state", "not_recognised")
    expect()(page.locator("#verdict-body .verdict-word .word")).to_have_text(table["verdict.not_recognised"])
    reasons = [table["reason.not_recognised"], table["reason.other_modality"]]  # the cause after the word
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
