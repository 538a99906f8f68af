"""`make screenshots`: the inspection console on the shipped models, as README shows it.

Starts `verity serve` as `make serve` does (temporary audit log and references), enrols 12 genuine
photos of the counterfeit's product as its references, submits synthetic images from the repository's
generators (a genuine photo and a 16-bit X-ray, then the counterfeit label photo naming its product) and
saves docs/screenshots/console-desktop.png (1366 x 768: the verdict, its heatmap and the product's
closest genuine references beside it), console-compare.png (the same with the difference from the
references as the overlay) and console-phone.png (390 x 844), then the desktop page in each of the
console's other languages (console-desktop-<language>.png: Russian, Kazakh, Kyrgyz, Tajik, Turkmen,
Uzbek). Needs Debian's Chromium (/usr/bin/chromium), like the browser tests.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]  # the test helpers: LiveServer, the samples, Chromium

from console_fixtures import (  # noqa: E402
    Sample,
    enrol_genuine_photos,
    launch,
    shipped_server,
    synthetic_samples,
)

if TYPE_CHECKING:
    from playwright.sync_api import FilePayload, Page

OUT = REPO / "docs" / "screenshots"
LANGUAGES = ("ru", "kk", "ky", "tg", "tk", "uz")  # besides English, in the order of the page's menu
WAIT_MS = 30_000


def _submit(page: Page, url: str, samples: list[Sample], product: str | None = None) -> None:
    """Opens the console and submits `samples`, then, naming `product`, the sample of that product."""
    from playwright.sync_api import expect

    page.goto(url, wait_until="networkidle")
    expect(page.locator("#console")).to_be_visible()
    page.locator("#case").fill("SEZ-2026-0412")
    batches = [[s for s in samples if s.product != product], [s for s in samples if s.product == product]]
    sent = 0
    for named, batch in zip((None, product), batches, strict=True):
        if not batch:
            continue
        page.locator("#product").fill(named or "")
        files: list[FilePayload] = [{"name": s.name, "mimeType": s.mime, "buffer": s.data} for s in batch]
        page.set_input_files("#file-input", files)
        sent += len(batch)
        expect(page.locator("#queue li[data-state=done]")).to_have_count(sent, timeout=WAIT_MS)


def _show(page: Page, name: str, references: bool = False) -> None:
    """Selects one result and waits until its image and heatmap (and its references) are drawn."""
    from playwright.sync_api import expect

    page.locator("#queue .queue-item", has_text=name).click()
    expect(page.locator("#viewer .heat-image")).to_be_visible()
    if references:
        expect(page.locator("#references .reference-image")).to_have_count(3)
        page.wait_for_function("() => [...document.querySelectorAll('#references .reference-image')]"
                               ".every((image) => image.complete && image.naturalWidth > 0)")  # fmt: skip
    page.evaluate("() => document.activeElement && document.activeElement.blur()")
    page.wait_for_timeout(300)  # the image's decode and the layout that fits it


def main() -> int:
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as temporary:
        root = Path(temporary)
        samples = synthetic_samples(root)
        order = [samples["genuine-photo"], samples["xray-16bit"], samples["counterfeit-photo"]]
        server = shipped_server(root, VERITY_REFERENCES_DIR=str(root / "references"))
        try:
            product = samples["counterfeit-photo"].product
            enrol_genuine_photos(server, root / "keys.json", product, count=12)
            with sync_playwright() as playwright:
                browser = launch(playwright)
                desktop = browser.new_context(viewport={"width": 1366, "height": 768}, locale="en-GB")
                page = desktop.new_page()
                _submit(page, server.url + "/", order, product)
                _show(page, "counterfeit-photo.jpg", references=True)
                page.screenshot(path=str(OUT / "console-desktop.png"))
                page.keyboard.press("d")  # the difference from the genuine references as the overlay
                page.wait_for_timeout(300)
                page.screenshot(path=str(OUT / "console-compare.png"))
                page.keyboard.press("d")
                for language in LANGUAGES:
                    page.locator("#language").select_option(language)
                    page.evaluate("() => document.activeElement && document.activeElement.blur()")
                    page.wait_for_timeout(300)
                    page.screenshot(path=str(OUT / f"console-desktop-{language}.png"))
                page.locator("#language").select_option("en")
                phone = browser.new_context(
                    viewport={"width": 390, "height": 844},
                    is_mobile=True,
                    has_touch=True,
                    locale="en-GB",
                )
                page = phone.new_page()
                _submit(page, server.url + "/", [samples["xray-16bit"]])
                _show(page, "xray-16bit.png")
                page.locator("#verdict-panel").evaluate("e => e.scrollIntoView({block: 'start'})")
                page.wait_for_timeout(200)
                page.screenshot(path=str(OUT / "console-phone.png"))
                browser.close()
        finally:
            server.stop()
    translated = [f"console-desktop-{language}.png" for language in LANGUAGES]
    names = ["console-desktop.png", "console-compare.png", "console-phone.png", *translated]
    for name in names:
        print(f"wrote {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
