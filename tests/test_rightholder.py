"""A right holder's key (issue 28 scope 1): it enrols and removes the genuine references of its own
products, reads the seizures of its products (without stations and cases unless the agency allows it),
and every other route answers 403 or 404, never 200."""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

import pytest
from api_fixtures import assert_error, make_settings
from fastapi.testclient import TestClient

from tests.test_references_api import enrol, noise_png, write_models
from verity import cli as verity_cli
from verity.api.app import create_app
from verity.api.auth import KeyStore
from verity.api.deps import RIGHTHOLDER_ROUTES

OWN, OTHER = "velmor-tea", "kestra-charger"


def _setup(tmp_path: Path, **settings: Any) -> tuple[Any, dict[str, dict[str, str]]]:
    write_models(tmp_path)
    config = make_settings(tmp_path, references_dir=tmp_path / "references", require_api_keys=True,
                           rate_limit_per_s=0, **settings)  # fmt: skip
    store = KeyStore(config.keys_file)
    secrets = {
        "admin": store.add("ops", role="admin")[1],
        "station": store.add("gate-1")[1],
        "acme": store.add("acme", role="rightholder", products=(OWN, "velmor-coffee"))[1],
        "rival": store.add("rival", role="rightholder", products=(OTHER,))[1],
    }
    return config, {name: {"X-API-Key": secret} for name, secret in secrets.items()}


def test_keys_name_their_products_and_only_a_right_holders_do(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("VERITY_KEYS_FILE", str(tmp_path / "keys.json"))
    added = ["keys", "add", "--rightholder", "acme", "--products", f"{OWN},velmor-coffee"]
    assert verity_cli.main(added) == 0
    assert capsys.readouterr().out.strip().startswith("vk_")
    for wrong in (["--rightholder", "acme"], ["--station", "gate-1", "--products", OWN],
                  ["--rightholder", "acme", "--products", OWN, "--admin"],
                  ["--rightholder", "acme", "--products", "Not A Product"]):  # fmt: skip
        with pytest.raises(SystemExit):
            verity_cli.main(["keys", "add", *wrong])
    capsys.readouterr()
    assert verity_cli.main(["keys", "list"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert " rightholder " in line and line.endswith(f"active  products velmor-coffee,{OWN}")
    (key,) = KeyStore(tmp_path / "keys.json").list_keys()
    assert key.role == "rightholder" and key.products == ("velmor-coffee", OWN)


def test_a_right_holder_manages_its_own_products_references(tmp_path: Path) -> None:
    config, keys = _setup(tmp_path)
    with TestClient(create_app(config)) as client:
        added = enrol(client, keys["acme"], [1, 2, 3], product=OWN)
        assert added.status_code == 200, added.text
        assert_error(enrol(client, keys["acme"], [4], product=OTHER), 403, "forbidden")
        assert enrol(client, keys["admin"], [5, 6], product=OTHER).status_code == 200
        listed = client.get("/v1/references?modality=photo", headers=keys["acme"]).json()
        assert [entry["product"] for entry in listed["products"]] == [OWN]  # not the other holder's
        assert_error(client.get(f"/v1/references?modality=photo&product={OTHER}", headers=keys["acme"]), 403)
        own = client.get(f"/v1/references?modality=photo&product={OWN}", headers=keys["acme"]).json()
        theirs = client.get(f"/v1/references?modality=photo&product={OTHER}", headers=keys["rival"]).json()
        # Another holder's reference is unknown to this key (404, as an id that never was), its own removable.
        other_id = theirs["references"][0]["reference_id"]
        assert_error(client.delete(f"/v1/references/{other_id}?modality=photo", headers=keys["acme"]), 404)
        own_id = own["references"][0]["reference_id"]
        # Its own references' images it may see (as a station may), another holder's are unknown to it.
        image = "/v1/references/{}/image?modality=photo"
        assert client.get(image.format(own_id), headers=keys["acme"]).status_code == 200
        assert_error(client.get(image.format(other_id), headers=keys["acme"]), 404, "unknown_reference")
        removed = client.delete(f"/v1/references/{own_id}?modality=photo", headers=keys["acme"])
        assert removed.status_code == 200 and removed.json()["removed"]["product"] == OWN
        assert client.get(f"/v1/references?modality=photo&product={OTHER}",
                          headers=keys["admin"]).json()["references"]  # fmt: skip


def _seize(client: TestClient, keys: dict[str, dict[str, str]], product: str, case: str) -> str:
    """A station's verdict naming the product (enrolled, so the product check runs)."""
    form = {"modality": "photo", "product": product, "case_id": case}
    answer = client.post("/v1/predict", files={"file": ("a.png", noise_png(40))}, data=form,
                         headers=keys["station"])  # fmt: skip
    assert answer.status_code == 200, answer.text
    request_id = answer.json()["request_id"]
    outcome = {"request_id": request_id, "confirmed_label": "counterfeit", "notes": "officer's note"}
    confirmed = client.post("/v1/feedback", json=outcome, headers=keys["station"])
    assert confirmed.status_code == 200, confirmed.text
    return request_id


@pytest.mark.parametrize("sees_stations", [False, True])
def test_a_right_holder_reads_its_products_seizures_only(tmp_path: Path, sees_stations: bool) -> None:
    config, keys = _setup(tmp_path, rightholder_sees_stations=sees_stations)
    with TestClient(create_app(config)) as client:
        for product, seeds in ((OWN, [1, 2, 3, 4, 5]), (OTHER, [11, 12, 13, 14, 15])):
            assert enrol(client, keys["admin"], seeds, product=product).status_code == 200
        own = _seize(client, keys, OWN, "SEZ-1")
        other = _seize(client, keys, OTHER, "SEZ-2")
        items = client.get("/v1/history", headers=keys["acme"]).json()["items"]
        assert [item["request_id"] for item in items] == [own]
        (item,) = items
        assert item["product"] == OWN and item["feedback"]["confirmed_label"] == "counterfeit"
        shown = (item["station_id"], item["case_id"], item["feedback"]["notes"])
        assert shown == (("gate-1", "SEZ-1", "officer's note") if sees_stations else (None, None, None))
        assert client.get(f"/v1/history/{own}", headers=keys["acme"]).json()["request_id"] == own
        assert_error(client.get(f"/v1/history/{other}", headers=keys["acme"]), 404)
        theirs = client.get("/v1/history", headers=keys["rival"]).json()["items"]
        assert [item["request_id"] for item in theirs] == [other]


def _fill(path: str) -> str:
    """A path with its parameters filled in: the right holder's own product where one is named."""
    return re.sub(r"\{[^}]+\}", "x", path.replace("{product}", OWN))


def test_every_other_route_refuses_a_right_holder(tmp_path: Path) -> None:
    """Each route of the API that needs a key (it answers 401 without one): a right holder's key gets
    403 on all but its own, never a 200; a route added later is refused until it is allowed on purpose.
    The public ones (health, readiness, the protocol's server metadata) answer anyone, keyed or not."""
    config, keys = _setup(tmp_path)
    with TestClient(create_app(config)) as client:
        paths = client.get("/openapi.json").json()["paths"]
        operations = [(method.upper(), path) for path, ops in paths.items() for method in ops]
        keyed = [(m, p) for m, p in operations if client.request(m, _fill(p)).status_code == 401]
        assert len(keyed) >= 15 and len(operations) - len(keyed) <= 8
        for method, path in keyed:
            if (method, path) in RIGHTHOLDER_ROUTES:
                continue
            answer = client.request(method, _fill(path), headers=keys["acme"])
            assert answer.status_code == 403, (method, path, answer.status_code, answer.text[:200])
            error = answer.json()["error"]  # /v2 answers in the protocol's shape, a message string
            assert ("right holder" in error) if path.startswith("/v2") else error["code"] == "forbidden"
        # The routes it has: nothing beyond them (a predict, a feedback, a reload, the metrics...).
        for method, path in RIGHTHOLDER_ROUTES:
            answer = client.request(method, _fill(path) + "?modality=photo", headers=keys["acme"])
            assert answer.status_code in (200, 404, 422), (method, path, answer.status_code)


def _guide(**changes: Any) -> dict[str, Any]:
    photo = base64.b64encode(noise_png(7)).decode()
    seal = {"en": "The seal carries a hologram of a leaf.", "ru": "На пломбе голограмма листа.",
            "kk": "Пломбада жапырақ голограммасы бар."}  # fmt: skip
    contact = {"name": "Velmor brand protection", "email": "protect@velmor.example",
               "phone": "+7 700 000 0000"}  # fmt: skip
    guide = {
        "points": [{"text": seal, "photo": photo}, {"text": {"en": "Batch code printed, never stamped."}}],
        "contacts": [contact],
        "valid_until": "2030-12-31",
    }
    return {**guide, **changes}


def test_a_right_holder_publishes_its_guides_and_stations_read_them(tmp_path: Path) -> None:
    from verity.api.audit import SQLiteAuditStore

    config, keys = _setup(tmp_path)
    with TestClient(create_app(config)) as client:
        first = client.put(f"/v1/products/{OWN}/guide", json=_guide(), headers=keys["acme"])
        assert first.status_code == 200, first.text
        assert first.json()["version"] == 1 and first.json()["role"] == "rightholder"
        lapsed = _guide(valid_until="2020-01-01")
        second = client.put(f"/v1/products/{OWN}/guide", json=lapsed, headers=keys["acme"])
        assert second.json()["version"] == 2
        seen = client.get(f"/v1/products/{OWN}", headers=keys["station"]).json()
        assert seen["guide_versions"] == [1, 2] and seen["guide"]["version"] == 2 and seen["expired"] is True
        assert seen["guide"]["points"][0]["text"]["kk"] == "Пломбада жапырақ голограммасы бар."
        earlier = client.get(f"/v1/products/{OWN}?version=1", headers=keys["station"]).json()
        assert earlier["guide"]["valid_until"] == "2030-12-31" and earlier["expired"] is False
        assert_error(client.get(f"/v1/products/{OWN}?version=9", headers=keys["station"]), 404)
        none_yet = client.get(f"/v1/products/{OTHER}", headers=keys["station"]).json()
        assert none_yet["guide"] is None and none_yet["guide_versions"] == []
        # Whose it is: another holder neither reads nor writes it, a station does not write.
        assert_error(client.get(f"/v1/products/{OWN}", headers=keys["rival"]), 403)
        assert_error(client.put(f"/v1/products/{OTHER}/guide", json=_guide(), headers=keys["acme"]), 403)
        assert_error(client.put(f"/v1/products/{OWN}/guide", json=_guide(), headers=keys["station"]), 403)
        # Plain data only.
        control = _guide(points=[{"text": {"en": "hidden\x1b[31m text"}}])
        pdf = base64.b64encode(b"%PDF-1.4").decode()
        bad_guides = (control, _guide(points=[{"text": {"en": "x"}, "photo": "not base64!"}]),
                      _guide(points=[{"text": {"en": "x"}, "photo": pdf}]),
                      _guide(points=[{"text": {"EN!": "x"}}]), _guide(points=[]),
                      _guide(script="<b>x</b>"))  # fmt: skip
        for bad in bad_guides:
            answer = client.put(f"/v1/products/{OWN}/guide", json=bad, headers=keys["acme"])
            assert answer.status_code == 422, (bad, answer.text)
        assert client.get(f"/v1/products/{OWN}", headers=keys["station"]).json()["guide_versions"] == [1, 2]
    store = SQLiteAuditStore(config.audit_db)
    try:
        guides = [e for e in store.reference_events() if e.action == "guide"]
    finally:
        store.close()
    assert [(e.product, e.role) for e in guides] == [(OWN, "rightholder")] * 2
    assert guides[0].image_sha256 != guides[1].image_sha256  # each version's own content hash
