"""The API of what an officer compares a suspect with (issue 28 scope 3): /v1/predict's `reference` names
the closest genuine references and carries the difference overlay, and GET
/v1/references/{reference_id}/image shows a reference to whoever may see its product."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_fixtures import assert_error, make_settings
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from tests.test_reference_compare import PAINTED, SIZE, label_photo
from verity.api.app import create_app
from verity.api.auth import KeyStore

MODEL, OWN, OTHER = "photo-patch", "velmor-tea", "kestra-charger"


def write_patch_model(root: Path) -> Path:
    """Under root/models: the tiny photo model with an embedding and local features (64 px, a 16 x 16
    map), and a plain X-ray model (a server is ready when each modality has one)."""
    spec = tiny_spec("photo", SIZE)
    tiny_onnx(root / "models" / MODEL / "1" / "model.onnx", spec, tiny_card(spec, MODEL, "1"), features=16,
              embedding=True, patches=True)  # fmt: skip
    xray = tiny_spec("xray", 32)
    tiny_onnx(root / "models" / "xray-plain" / "1" / "model.onnx", xray, tiny_card(xray, "xray-plain", "1"))
    return root / "models"


def png_size(encoded: str) -> tuple[int, int]:
    return Image.open(io.BytesIO(base64.b64decode(encoded))).size


@pytest.fixture()
def served(tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, dict[str, str]], dict[str, bytes]]]:
    """A keys-required server on the patch model; 8 genuine references of OWN (acme's) and 5 of OTHER
    (rival's), enrolled by the admin; the images by reference id."""
    write_patch_model(tmp_path)
    config = make_settings(tmp_path, references_dir=tmp_path / "references", require_api_keys=True,
                           rate_limit_per_s=0)  # fmt: skip
    store = KeyStore(config.keys_file)
    secrets = {
        "admin": store.add("ops", role="admin")[1],
        "station": store.add("gate-1")[1],
        "acme": store.add("acme", role="rightholder", products=(OWN,))[1],
        "rival": store.add("rival", role="rightholder", products=(OTHER,))[1],
    }
    keys = {name: {"X-API-Key": secret} for name, secret in secrets.items()}
    rng = np.random.default_rng(0)
    images: dict[str, bytes] = {}
    with TestClient(create_app(config)) as client:
        for product, count in ((OWN, 8), (OTHER, 5)):
            photos = [label_photo(rng) for _ in range(count)]
            files = [("files", (f"{product}-{i}.png", data, "image/png")) for i, data in enumerate(photos)]
            enrolled = client.post("/v1/references", files=files, headers=keys["admin"],
                                   data={"product": product, "model": MODEL})  # fmt: skip
            assert enrolled.status_code == 200, enrolled.text
            for result, data in zip(enrolled.json()["results"], photos, strict=True):
                images[result["reference_id"]] = data
        yield client, keys, images


def suspect(client: TestClient, headers: dict[str, str], **form: Any) -> dict[str, Any]:
    data = label_photo(np.random.default_rng(9), painted=PAINTED)
    fields = {"modality": "photo", "product": OWN, **{k: str(v) for k, v in form.items()}}
    answer = client.post("/v1/predict", files={"file": ("s.png", data, "image/png")}, data=fields,
                         headers=headers)  # fmt: skip
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_a_verdict_naming_the_product_names_its_closest_references_and_draws_the_difference(
    served: tuple[TestClient, dict[str, dict[str, str]], dict[str, bytes]],
) -> None:
    client, keys, _ = served
    body = suspect(client, keys["station"], return_heatmap="true", return_view="true")
    reference = body["reference"]
    listed = client.get(f"/v1/references?model={MODEL}&product={OWN}", headers=keys["admin"]).json()
    enrolled = {item["reference_id"] for item in listed["references"]}
    closest = reference["closest"]
    assert len(closest) == 3 and {near["reference_id"] for near in closest} <= enrolled
    assert [near["distance"] for near in closest] == sorted(near["distance"] for near in closest)
    # The overlay: over the same view, at the heatmap's size; the painted square lies beyond the limit.
    sizes = {png_size(body["heatmap_png"]), png_size(body["view_png"]), png_size(reference["difference_png"])}
    assert sizes == {(SIZE, SIZE)}
    assert reference["difference_max"] > 3.0
    # Without the heatmap asked for, no overlay (its PNG is most of an answer's size); the closest stay.
    plain = suspect(client, keys["station"])["reference"]
    assert plain["difference_png"] is None and plain["difference_max"] is None
    assert plain["closest"] == closest
    # No product named, no reference object at all.
    form = {"modality": "photo", "return_heatmap": "true"}
    files = {"file": ("s.png", label_photo(np.random.default_rng(3)))}
    unnamed = client.post("/v1/predict", files=files, data=form, headers=keys["station"])
    assert unnamed.status_code == 200 and unnamed.json()["reference"] is None


def test_the_reference_image_goes_to_those_who_may_see_its_product(
    served: tuple[TestClient, dict[str, dict[str, str]], dict[str, bytes]],
) -> None:
    client, keys, images = served
    body = suspect(client, keys["station"])
    own_id = body["reference"]["closest"][0]["reference_id"]
    url = f"/v1/references/{own_id}/image?model={MODEL}"
    for who in ("station", "admin", "acme"):
        answer = client.get(url, headers=keys[who])
        assert answer.status_code == 200, (who, answer.text)
        assert answer.content == images[own_id]
        assert answer.headers["content-type"] == "image/png"
        assert answer.headers["cache-control"] == "private"
        assert answer.headers["x-content-type-options"] == "nosniff"
    # Another holder's reference is unknown to this key: the very answer an id that never was gets.
    listed = client.get(f"/v1/references?model={MODEL}&product={OTHER}", headers=keys["admin"]).json()
    other_id = listed["references"][0]["reference_id"]
    other_url = f"/v1/references/{other_id}/image?model={MODEL}"
    assert client.get(other_url, headers=keys["rival"]).status_code == 200  # its own holder's
    theirs = client.get(other_url, headers=keys["acme"])
    unknown_id = "0" * 32
    unknown = client.get(f"/v1/references/{unknown_id}/image?model={MODEL}", headers=keys["acme"])
    assert_error(theirs, 404, "unknown_reference")
    assert_error(unknown, 404, "unknown_reference")
    said = theirs.json()["error"]["message"].replace(other_id, unknown_id)
    assert said == unknown.json()["error"]["message"]
    assert_error(client.get(url, headers=keys["rival"]), 404, "unknown_reference")
    # Anonymous: 401 where keys are required.
    assert_error(client.get(url), 401, "unauthorized")
    # A removed reference is no longer shown; an unknown model is named as such.
    assert client.delete(f"/v1/references/{own_id}?model={MODEL}", headers=keys["admin"]).status_code == 200
    assert_error(client.get(url, headers=keys["station"]), 404, "unknown_reference")
    assert_error(client.get(other_url.replace(MODEL, "nope"), headers=keys["station"]), 404, "unknown_model")


def test_anonymous_callers_read_reference_images_where_keys_are_not_required(tmp_path: Path) -> None:
    write_patch_model(tmp_path)
    config = make_settings(tmp_path, references_dir=tmp_path / "references", rate_limit_per_s=0)
    _, admin = KeyStore(config.keys_file).add("ops", role="admin")
    data = label_photo(np.random.default_rng(1))
    with TestClient(create_app(config)) as client:
        form = {"product": OWN, "modality": "photo"}
        files = [("files", ("r.png", data, "image/png"))]
        enrolled = client.post("/v1/references", files=files, data=form, headers={"X-API-Key": admin})
        reference_id = enrolled.json()["results"][0]["reference_id"]
        answer = client.get(f"/v1/references/{reference_id}/image?modality=photo")
        assert answer.status_code == 200 and answer.content == data
