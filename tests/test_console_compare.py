"""The console compares (issue 28 scope 3): an officer submits a suspect naming the product and sees the
product's closest genuine references beside it, switches the viewer to where the suspect differs from
them, and confirms the verdict with one key, in Chromium on a server with a tiny model that has local
features."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from api_fixtures import LiveServer, server_env
from console_fixtures import Sample
from console_pages import Watch, blur, expect, sign_in, upload, wait_done

from tests.test_reference_compare import PAINTED, label_photo
from tests.test_reference_images_api import write_patch_model

pytestmark = pytest.mark.slow
PRODUCT = "velmor-tea"


@pytest.fixture(scope="module")
def compared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    """Keys required; the right holder enrolled 8 genuine references of its product; a station's key."""
    from verity.api.auth import KeyStore

    root = tmp_path_factory.mktemp("console-compare")
    models = write_patch_model(root / "patch")
    env = server_env(root, VERITY_MODELS_DIR=str(models), VERITY_REQUIRE_API_KEYS="true",
                     VERITY_REFERENCES_DIR=str(root / "refs"), VERITY_RATE_LIMIT_PER_S="0")  # fmt: skip
    live = LiveServer(env)
    store = KeyStore(root / "keys.json")
    keys = {"station": store.add("gate-1")[1],
            "acme": store.add("acme", role="rightholder", products=(PRODUCT,))[1]}  # fmt: skip
    live.start()
    rng = np.random.default_rng(0)
    files = [("files", (f"r{i}.png", label_photo(rng), "image/png")) for i in range(8)]
    form = {"product": PRODUCT, "modality": "photo"}
    enrolled = httpx.post(f"{live.url}/v1/references", files=files, data=form,
                          headers={"X-API-Key": keys["acme"]}, timeout=60)  # fmt: skip
    assert enrolled.status_code == 200, enrolled.text
    yield live, keys
    live.stop()


def test_an_officer_compares_the_suspect_with_genuine_references_and_confirms_with_one_key(
    new_page: Callable[..., tuple[Any, Watch]], compared: tuple[LiveServer, dict[str, str]]
) -> None:
    live, keys = compared
    page, watch = new_page(live)
    sign_in(page, keys["station"])
    page.locator("#product").fill(PRODUCT)
    page.locator("#modality").select_option("photo")
    suspect = label_photo(np.random.default_rng(9), painted=PAINTED)
    upload(page, [Sample("suspect.png", suspect, "image/png", "photo")])
    wait_done(page, 1)
    # Beside the suspect: the three closest genuine references, their images drawn, each with its distance.
    references = page.locator("#viewer #references")
    expect()(references).to_be_visible()
    expect()(references.locator("h3")).to_have_text("Closest genuine references")
    images = references.locator(".reference-image")
    expect()(images).to_have_count(3)
    page.wait_for_function("() => [...document.querySelectorAll('#references .reference-image')]"
                           ".every((image) => image.complete && image.naturalWidth > 0)")  # fmt: skip
    assert images.first.get_attribute("src").startswith("blob:")
    assert images.first.get_attribute("alt") == f"Genuine reference 1 of {PRODUCT}"
    distances = references.locator(".reference-distance").all_text_contents()
    assert len(distances) == 3 and all(text.startswith("distance 0.") for text in distances)
    # The second overlay: the difference from the genuine references, by its button and by `d`.
    heat, difference = page.locator("#viewer .heat-toggle"), page.locator("#viewer .diff-toggle")
    overlay = page.locator("#viewer .heat-image")
    expect()(difference).to_be_enabled()
    heatmap_src = overlay.get_attribute("src")
    difference.click()
    expect()(difference).to_have_attribute("aria-pressed", "true")
    expect()(heat).to_have_attribute("aria-pressed", "false")
    drawn = overlay.get_attribute("src")
    assert drawn != heatmap_src and drawn.startswith("data:image/png;base64,")
    expect()(overlay).to_be_visible()
    note = page.locator("#viewer .overlay-note")
    expect()(note).to_contain_text("Coloured: parts further from the genuine references")
    assert overlay.get_attribute("alt").startswith("Difference:")
    blur(page)
    page.keyboard.press("d")  # back to the heatmap
    expect()(heat).to_have_attribute("aria-pressed", "true")
    assert overlay.get_attribute("src") == heatmap_src
    expect()(note).to_be_hidden()
    page.keyboard.press("d")
    expect()(difference).to_have_attribute("aria-pressed", "true")
    # In Russian, the same parts in Russian.
    page.locator("#language").select_option("ru")
    expect()(references.locator("h3")).to_have_text("Ближайшие подлинные эталоны")
    expect()(page.locator("#viewer .diff-toggle")).to_have_text("Отличия (d)")
    page.locator("#language").select_option("en")
    # Confirming is one key, as before.
    blur(page)
    page.keyboard.press("c")
    expect()(page.locator("#feedback-status")).to_have_text("Recorded: Confirmed counterfeit")
    request_id = page.locator("#verdict-details .request-id").text_content()
    row = page.locator(f"#history .history-row[data-request-id='{request_id}']")
    expect()(row.locator(".h-outcome")).to_have_text("Confirmed counterfeit")
    expect()(references.locator(".reference-image")).to_have_count(3)  # still beside it
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []  # the sign-in probe before the key


def test_the_references_fit_a_phone(
    new_page: Callable[..., tuple[Any, Watch]], compared: tuple[LiveServer, dict[str, str]]
) -> None:
    """On a 390 px phone the references sit in a row under the suspect, inside the page's width."""
    live, keys = compared
    page, _ = new_page(live, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    sign_in(page, keys["station"])
    page.locator("#product").fill(PRODUCT)
    page.locator("#modality").select_option("photo")
    upload(page, [Sample("suspect.png", label_photo(np.random.default_rng(10)), "image/png", "photo")])
    wait_done(page, 1)
    images = page.locator("#references .reference-image")
    expect()(images).to_have_count(3)
    boxes = [images.nth(i).bounding_box() for i in range(3)]
    stage = page.locator("#viewer .stage").bounding_box()
    assert all(box is not None for box in boxes) and stage is not None
    assert all(box["y"] >= stage["y"] + stage["height"] for box in boxes)  # under the image
    assert len({round(box["y"]) for box in boxes}) == 1  # in one row
    assert max(box["x"] + box["width"] for box in boxes) <= 390
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
