"""The loop of issue 28 in the browser, on a live server: a right holder enrols genuine references and
publishes a guide; an officer names the product, submits a suspect and sees the guide, the closest
references and the difference overlay; confirms counterfeit with one key and is told an alert went;
the right holder's receiver gets one alert signed with its secret; and the right holder, signed into the
console, sees that seizure and nothing of another holder's."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import numpy as np
import pytest
from alert_receiver import AlertReceiver
from api_fixtures import LiveServer, server_env
from console_fixtures import Sample
from console_pages import Watch, blur, expect, sign_in, upload, wait_done

from tests.test_alerts import wait_for
from tests.test_reference_compare import PAINTED, label_photo
from tests.test_reference_images_api import write_patch_model

pytestmark = pytest.mark.slow
OWN, OTHER = "velmor-tea", "kestra-charger"
POINT = "Check the leaf hologram on the seal."


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveServer, dict[str, str], Any, str]]:
    from verity.api.alert_endpoints import EndpointStore
    from verity.api.auth import KeyStore

    root = tmp_path_factory.mktemp("console-loop")
    models = write_patch_model(root / "patch")
    env = server_env(root, VERITY_MODELS_DIR=str(models), VERITY_REQUIRE_API_KEYS="true",
                     VERITY_REFERENCES_DIR=str(root / "refs"), VERITY_RATE_LIMIT_PER_S="0")  # fmt: skip
    store = KeyStore(root / "keys.json")
    keys = {"station": store.add("gate-1")[1],
            "acme": store.add("acme", role="rightholder", products=(OWN,))[1],
            "rival": store.add("rival", role="rightholder", products=(OTHER,))[1]}  # fmt: skip
    receiver = AlertReceiver().start()
    secret = EndpointStore(root / "alert_endpoints.json").add("acme", receiver.url).secret
    live = LiveServer(env).start()
    rng = np.random.default_rng(0)
    for holder, product in (("acme", OWN), ("rival", OTHER)):
        files = [("files", (f"r{i}.png", label_photo(rng), "image/png")) for i in range(6)]
        enrolled = httpx.post(f"{live.url}/v1/references", files=files, timeout=60,
                              data={"product": product, "modality": "photo"},
                              headers={"X-API-Key": keys[holder]})  # fmt: skip
        assert enrolled.status_code == 200, enrolled.text
    contact = {"name": "Velmor brand protection", "email": "protect@velmor.example"}
    guide = {"points": [{"text": {"en": POINT}}], "valid_until": "2030-12-31", "contacts": [contact]}
    published = httpx.put(f"{live.url}/v1/products/{OWN}/guide", json=guide, timeout=30,
                          headers={"X-API-Key": keys["acme"]})  # fmt: skip
    assert published.status_code == 200, published.text
    yield live, keys, receiver, secret
    live.stop()
    receiver.stop()


def test_the_loop_from_a_guide_to_a_signed_alert_in_the_console(
    new_page: Callable[..., tuple[Any, Watch]], loop: tuple[LiveServer, dict[str, str], Any, str]
) -> None:
    live, keys, receiver, secret = loop
    other_photo = {"file": ("o.png", label_photo(np.random.default_rng(5)))}
    form = {"modality": "photo", "product": OTHER}
    other = httpx.post(f"{live.url}/v1/predict", files=other_photo, data=form,
                       headers={"X-API-Key": keys["station"]}, timeout=60)  # fmt: skip
    assert other.status_code == 200, other.text
    # The officer names the product and submits the suspect.
    page, watch = new_page(live)
    sign_in(page, keys["station"])
    page.locator("#product").fill(OWN)
    page.locator("#modality").select_option("photo")
    upload(page, [Sample("suspect.png", label_photo(np.random.default_rng(9), painted=PAINTED), "image/png",
                         "photo")])  # fmt: skip
    wait_done(page, 1)
    # The guide, the closest references and the difference overlay.
    expect()(page.locator("#verdict-details .guide .guide-text")).to_have_text(POINT)
    expect()(page.locator("#references .reference-image")).to_have_count(3)
    page.wait_for_function("() => [...document.querySelectorAll('#references .reference-image')]"
                           ".every((image) => image.complete && image.naturalWidth > 0)")  # fmt: skip
    page.locator("#viewer .diff-toggle").click()
    expect()(page.locator("#viewer .diff-toggle")).to_have_attribute("aria-pressed", "true")
    assert page.locator("#viewer .heat-image").get_attribute("alt").startswith("Difference:")
    # One key confirms counterfeit; the page says the seizure alert is on its way.
    blur(page)
    page.keyboard.press("c")
    expect()(page.locator("#feedback-status")).to_have_text(
        "Recorded: Confirmed counterfeit · seizure alerts queued: 1")
    request_id = page.locator("#verdict-details .request-id").text_content()
    # The right holder's receiver gets one alert, signed with its secret.
    wait_for(lambda: len(receiver.received) == 1)
    time.sleep(1.5)
    (alert,) = receiver.received
    assert receiver.all_verify(secret, time.time())
    assert (alert.json()["request_id"], alert.json()["product"]) == (request_id, OWN)
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []
    # The right holder, in the console, sees the seizure of its product and nothing of the other's.
    holder_page, holder_watch = new_page(live)
    sign_in(holder_page, keys["acme"])
    rows = holder_page.locator("#history .history-row")
    expect()(rows.first).to_be_visible()
    assert rows.evaluate_all("(rows) => rows.map((row) => row.dataset.requestId)") == [request_id]
    expect()(rows.first.locator(".h-outcome")).to_have_text("Confirmed counterfeit")
    assert set(rows.locator(".h-product").all_text_contents()) == {OWN}
    assert holder_watch.unexpected_errors(allowed_statuses=(401,)) == []
