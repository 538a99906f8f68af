"""The inspection console in a real browser on a server that requires keys: sign-in, each station's own
history, a revoked key, and what the page says when a file is too large, the server busy or unreachable.
Helpers and fixtures: tests/console_pages.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest
from api_fixtures import DARK
from console_fixtures import Sample
from console_pages import (
    WAIT_MS,
    KeyedServer,
    Watch,
    english_table,
    expect,
    keyboard_flow,
    sign_in,
    upload,
    wait_done,
)

pytestmark = pytest.mark.slow


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
    request_id = keyboard_flow(page, samples["genuine-photo"])
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
    # The history's first load must be answered before the key goes: on busy cores it could reach the
    # server after the revocation, send the page back to sign-in, and hide the button clicked below.
    expect()(page.locator("#history .history-status")).not_to_have_text("Loading…")
    store = KeyStore(keyed.keys_file)
    (key_id,) = [k.key_id for k in store.list_keys() if k.station_id == "lane-c"]
    store.revoke(key_id)
    page.locator("#history .history-refresh").click()
    expect()(page.locator("#signin-key")).to_be_visible()
    expect()(page.locator("#signin-message")).to_have_text("The server refused your key. Sign in again.")
    expect()(page.locator("#console")).to_be_hidden()
    assert page.evaluate("() => sessionStorage.getItem('verity.key')") is None
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []


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


def test_an_admin_sees_the_models_panel_and_a_station_does_not(
    new_page: Callable[..., tuple[Any, Watch]], keyed: KeyedServer, samples: dict[str, Sample]
) -> None:
    _predict_as(keyed, "lane-a", samples["genuine-photo"], "CASE-FOR-DRIFT")
    page, watch = new_page(keyed.live)
    sign_in(page, keyed.keys["lane-a"])
    expect()(page.locator("#history .history-row").first).to_be_visible()  # the console has settled
    expect()(page.locator("#lifecycle-open")).to_be_hidden()
    page.locator("#signout").click()
    sign_in(page, keyed.keys["hq"])
    expect()(page.locator("#signed-state")).to_have_text("Signed in with an admin key")
    page.locator("#lifecycle-open").click()
    dialog = page.locator("#lifecycle")
    expect()(dialog).to_be_visible()
    photo = dialog.locator("tr[data-model=photo-test]")
    expect()(photo.locator(".lc-production")).to_have_text("2")  # the first start adopted the newest
    expect()(photo.locator(".lc-modality")).to_have_text("Photo")
    expect()(photo.locator(".lc-event")).to_contain_text("adopted 2")
    # Version 1's comparison against production, from the compare.json beside it, judged as it was.
    candidate = photo.locator(".lc-candidate[data-version='1'] .lc-comparison")
    expect()(candidate).to_have_text(
        "ROC AUC −0.041 against production (95 %: −0.070 to −0.012), 120 images: worse beyond noise"
    )
    expect()(dialog.locator("tr[data-model=xray-test] .lc-candidates")).to_have_text("–")
    expect()(dialog.locator(".lifecycle-shadow")).to_have_text("No shadow model (VERITY_SHADOW is not set).")
    # The tiny models' cards hold no drift reference (tests/test_drift.py measures a model that has one).
    expect()(dialog.locator(".lifecycle-drift")).to_contain_text("No stream measured yet")
    # A station whose stream drifted, as the server reports it: the alert is said in words.
    body = httpx.get(f"{keyed.live.url}/v1/lifecycle", headers={"X-API-Key": keyed.keys["hq"]}, timeout=10)
    drifted = {"station": "lane-a", "modality": "xray", "model": "xray-test/1", "window": 200,
               "score_psi": 0.41, "brightness_psi": 0.05, "not_recognised_rate": 0.03,
               "val_not_recognised_rate": 0.01, "alert": True}  # fmt: skip
    page.route("**/v1/lifecycle", lambda route: route.fulfill(json={**body.json(), "drift": [drifted]}))
    dialog.locator(".lifecycle-refresh").click()
    lane = dialog.locator(".lc-drift", has_text="lane-a · X-ray · xray-test/1")
    expect()(lane).to_have_attribute("data-alert", "true")
    figures = "score PSI 0.41, brightness PSI 0.05, not recognised 3.0 % (validation 1.0 %)"
    expect()(lane).to_contain_text(figures)
    expect()(lane.locator(".lc-alert")).to_have_text("Drift alert")
    page.unroute("**/v1/lifecycle")
    # In Russian, the same panel in the officer's language.
    page.locator("#language").select_option("ru")
    expect()(dialog.locator("#lifecycle-title")).to_have_text("Модели, продвижение и дрейф")
    expect()(candidate).to_contain_text("хуже сверх шума")
    page.locator("#language").select_option("en")
    dialog.locator(".lifecycle-close").click()
    expect()(dialog).to_be_hidden()
    page.locator("#signout").click()
    expect()(page.locator("#lifecycle-open")).to_be_hidden()
    assert watch.unexpected_errors(allowed_statuses=(401,)) == []
