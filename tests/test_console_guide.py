"""The console shows the right holder's guide beside a verdict that names the product (issue 28 scope 3,
in part): a right holder enrols references and publishes a guide over HTTP, an officer submits a suspect
naming the product, and the details panel lists the points to check in the officer's language."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from api_fixtures import LiveServer, server_env
from console_fixtures import Sample
from console_pages import Watch, expect, sign_in, upload, wait_done

from tests.test_references_api import noise_png, write_models

pytestmark = pytest.mark.slow
PRODUCT = "velmor-tea"


@pytest.fixture(scope="module")
def guided(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str]]]:
    from verity.api.auth import KeyStore

    root = tmp_path_factory.mktemp("console-guide")
    models = write_models(root / "embedding")  # a tiny photo model with an embedding: references work
    env = server_env(root, VERITY_MODELS_DIR=str(models), VERITY_REQUIRE_API_KEYS="true",
                     VERITY_REFERENCES_DIR=str(root / "refs"), VERITY_RATE_LIMIT_PER_S="0")  # fmt: skip
    live = LiveServer(env)
    store = KeyStore(root / "keys.json")
    keys = {"station": store.add("gate-1")[1],
            "acme": store.add("acme", role="rightholder", products=(PRODUCT,))[1]}  # fmt: skip
    live.start()
    holder = {"X-API-Key": keys["acme"]}
    files = [("files", (f"r{seed}.png", noise_png(seed), "image/png")) for seed in range(1, 6)]
    form = {"product": PRODUCT, "modality": "photo"}
    enrolled = httpx.post(f"{live.url}/v1/references", files=files, data=form, headers=holder, timeout=60)
    assert enrolled.status_code == 200, enrolled.text
    text = {"en": "Check the leaf hologram on the seal.", "ru": "Проверьте голограмму листа на пломбе."}
    guide = {"points": [{"text": text, "photo": base64.b64encode(noise_png(9)).decode()}],
             "contacts": [{"name": "Velmor brand protection", "email": "protect@velmor.example"}],
             "valid_until": "2030-12-31"}  # fmt: skip
    published = httpx.put(f"{live.url}/v1/products/{PRODUCT}/guide", json=guide, headers=holder, timeout=30)
    assert published.status_code == 200, published.text
    yield live, keys
    live.stop()


def test_a_verdict_naming_the_product_shows_its_guide(
    new_page: Callable[..., tuple[Any, Watch]], guided: tuple[LiveServer, dict[str, str]]
) -> None:
    live, keys = guided
    page, watch = new_page(live)
    sign_in(page, keys["station"])
    page.locator("#product").fill(PRODUCT)
    page.locator("#modality").select_option("photo")
    upload(page, [Sample("suspect.png", noise_png(40), "image/png", "photo")])
    wait_done(page, 1)
    guide = page.locator("#verdict-details .guide")
    expect()(guide).to_be_visible()
    expect()(guide.locator("h3")).to_have_text("Right holder's guide: points to check")
    expect()(guide.locator(".guide-text")).to_have_text("Check the leaf hologram on the seal.")
    expect()(guide.locator(".guide-photo")).to_be_visible()
    assert guide.locator(".guide-photo").get_attribute("src").startswith("data:image/png;base64,")
    contact = "Velmor brand protection · protect@velmor.example"
    expect()(guide.locator(".guide-contacts li")).to_have_text(contact)
    expect()(guide.locator(".guide-validity")).to_have_text("Valid until 2030-12-31")
    # In Russian, the point in Russian; in Kazakh, which it lacks, English first.
    page.locator("#language").select_option("ru")
    expect()(guide.locator(".guide-text")).to_have_text("Проверьте голограмму листа на пломбе.")
    page.locator("#language").select_option("kk")
    english = "Check the leaf hologram on the seal."
    expect()(page.locator("#verdict-details .guide .guide-text")).to_have_text(english)
    page.locator("#language").select_option("en")
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []  # the sign-in probe before the key


def test_a_right_holder_reads_its_products_seizures_in_the_console(
    new_page: Callable[..., tuple[Any, Watch]], guided: tuple[LiveServer, dict[str, str]]
) -> None:
    """The right holder's end of the loop in the browser: its key signs in, the page offers no
    submitting or confirming (the server refuses both), and its history holds the seizures of its product
    only, without the station or case (the agency has not allowed them); a row opens with the guide."""
    live, keys = guided
    station = {"X-API-Key": keys["station"]}
    for product, case in ((PRODUCT, "SEZ-GUIDE"), (None, "SEZ-OTHER")):
        form = {"modality": "photo", "case_id": case, **({"product": product} if product else {})}
        answer = httpx.post(f"{live.url}/v1/predict", files={"file": ("s.png", noise_png(41), "image/png")},
                            data=form, headers=station, timeout=60)  # fmt: skip
        assert answer.status_code == 200, answer.text
    page, watch = new_page(live)
    sign_in(page, keys["acme"])
    expect()(page.locator("#signed-state")).to_have_text("Signed in for right holder acme")
    expect()(page.locator(".submit")).to_be_hidden()
    rows = page.locator("#history .history-row")
    expect()(rows.first).to_be_visible()
    assert set(rows.locator(".h-product").all_text_contents()) == {PRODUCT}  # never the other record
    assert set(rows.locator(".h-case").all_text_contents()) == {""}  # the case is the agency's to show
    rows.first.click()
    guide_text = page.locator("#verdict-details .guide .guide-text")
    expect()(guide_text).to_have_text("Check the leaf hologram on the seal.")
    expect()(page.locator(".feedback")).to_be_hidden()
    page.locator("#language").select_option("ru")
    expect()(page.locator("#signed-state")).to_have_text("Вход за правообладателя acme")
    page.locator("#language").select_option("en")
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []
