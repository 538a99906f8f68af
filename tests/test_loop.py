"""Customs and the right holder in one loop (issue 28's acceptance, over HTTP): the right holder enrols
references and publishes a guide with its own key; an officer submits a suspect naming the product and
gets the guide, the closest genuine references and the difference overlay; the officer confirms
counterfeit; the right holder's receiver gets one alert, signed with its secret; and the right holder's
key reads that seizure and nothing of another holder's."""

from __future__ import annotations

import base64
import io
import time

from alert_receiver import AlertReceiver
from api_fixtures import BRIGHT, assert_error
from fastapi.testclient import TestClient
from PIL import Image

from tests.test_alerts import wait_for
from tests.test_reference_images_api import MODEL as PATCH_MODEL
from tests.test_reference_images_api import write_patch_model
from tests.test_references_api import enrol
from tests.test_rightholder import OTHER, OWN, _setup
from verity.api.alert_endpoints import EndpointStore
from verity.api.app import create_app

GUIDE = {
    "points": [{"text": {"en": "Check the leaf hologram on the seal.",
                         "ru": "Проверьте голограмму листа на пломбе."}}],
    "contacts": [{"name": "Velmor brand protection", "email": "protect@velmor.example"}],
    "valid_until": "2030-12-31",
}  # fmt: skip


def _png_size(encoded: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(encoded))).size


def test_the_loop_from_a_right_holders_guide_to_its_signed_alert(tmp_path) -> None:
    config, keys = _setup(tmp_path)
    write_patch_model(tmp_path)  # a photo model with local features, for the difference map
    config = config.model_copy(update={"pinned_models": {"photo": PATCH_MODEL}})
    receiver = AlertReceiver().start()
    secret = EndpointStore(config.alert_endpoints_file).add("acme", receiver.url).secret
    try:
        with TestClient(create_app(config)) as client:
            # 1. The right holder enrols references and a guide, with its own key.
            assert enrol(client, keys["acme"], [1, 2, 3, 4, 5], product=OWN).status_code == 200
            published = client.put(f"/v1/products/{OWN}/guide", json=GUIDE, headers=keys["acme"])
            assert published.status_code == 200, published.text
            assert enrol(client, keys["rival"], [11, 12, 13, 14, 15], product=OTHER).status_code == 200
            # 2. The officer submits a suspect naming the product: the guide, the closest references,
            # the difference overlay.
            form = {"modality": "photo", "product": OWN, "case_id": "SEZ-LOOP", "return_heatmap": "true"}
            answer = client.post("/v1/predict", files={"file": ("s.png", BRIGHT, "image/png")}, data=form,
                                 headers=keys["station"])  # fmt: skip
            assert answer.status_code == 200, answer.text
            result = answer.json()
            guide = client.get(f"/v1/products/{OWN}", headers=keys["station"]).json()
            assert guide["guide"]["points"][0]["text"]["en"] == GUIDE["points"][0]["text"]["en"]
            reference = result["reference"]
            enrolled = client.get(f"/v1/references?modality=photo&product={OWN}", headers=keys["admin"])
            known = {item["reference_id"] for item in enrolled.json()["references"]}
            closest = [item["reference_id"] for item in reference["closest"]]
            assert len(closest) == 3 and set(closest) <= known
            distances = [item["distance"] for item in reference["closest"]]
            assert distances == sorted(distances)
            image = client.get(f"/v1/references/{closest[0]}/image?modality=photo", headers=keys["station"])
            assert image.status_code == 200 and image.headers["content-type"] == "image/png"
            assert _png_size(reference["difference_png"]) == _png_size(result["heatmap_png"])
            # 3. The officer confirms counterfeit.
            request_id = result["request_id"]
            outcome = {"request_id": request_id, "confirmed_label": "counterfeit"}
            confirmed = client.post("/v1/feedback", json=outcome, headers=keys["station"])
            assert confirmed.status_code == 200 and confirmed.json()["alerts"] == 1
            # 4. The right holder's receiver gets one alert, signed with its secret.
            wait_for(lambda: len(receiver.received) == 1)
            time.sleep(1.5)  # and no second one
            # 5. The right holder's key reads the seizure, and nothing of another holder's.
            history = client.get("/v1/history", headers=keys["acme"]).json()["items"]
            assert [item["request_id"] for item in history] == [request_id]
            assert history[0]["feedback"]["confirmed_label"] == "counterfeit"
            assert client.get(f"/v1/history/{request_id}", headers=keys["rival"]).status_code == 404
            assert client.get("/v1/history", headers=keys["rival"]).json()["items"] == []
            assert_error(client.get(f"/v1/products/{OTHER}", headers=keys["acme"]), 403)
    finally:
        receiver.stop()
    (alert,) = receiver.received
    assert receiver.all_verify(secret, time.time())
    body = alert.json()
    assert (body["event"], body["product"], body["request_id"]) == ("seizure.confirmed", OWN, request_id)
