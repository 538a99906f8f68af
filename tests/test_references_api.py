"""/v1/references and `verity refs`: enrolment round trips with auth, persistence and the audit log.

The models are the tiny ONNX model with an embedding output (photo-ref) and one without (xray-plain);
the images are small noise PNGs, each its own SHA-256.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from api_fixtures import assert_error, make_settings
from fastapi.testclient import TestClient
from PIL import Image

from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
from verity.api.app import create_app
from verity.api.audit import AuditError, ReferenceEvent, SQLiteAuditStore
from verity.api.auth import KeyStore
from verity.api.oip_codec import output_names
from verity.api.refs_cli import refs_main
from verity.api.settings import Settings
from verity.cli import main as verity_main

MODEL = "photo-ref"


def noise_png(seed: int, size: tuple[int, int] = (40, 48)) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def write_models(root: Path) -> Path:
    models = root / "models"
    photo = tiny_spec("photo", 32)
    tiny_onnx(
        models / MODEL / "1" / "model.onnx", photo, tiny_card(photo, MODEL, "1"), features=8, embedding=True
    )
    xray = tiny_spec("xray", 32)
    tiny_onnx(models / "xray-plain" / "1" / "model.onnx", xray, tiny_card(xray, "xray-plain", "1"))
    return models


@pytest.fixture()
def ref_settings(tmp_path: Path) -> Settings:
    write_models(tmp_path)
    return make_settings(tmp_path, references_dir=tmp_path / "references", require_api_keys=True)


@pytest.fixture()
def keys(ref_settings: Settings) -> dict[str, Any]:
    store = KeyStore(ref_settings.keys_file)
    admin, admin_secret = store.add("ops", role="admin")
    _, station_secret = store.add("gate-1")
    return {
        "admin": {"X-API-Key": admin_secret},
        "admin_id": admin.key_id,
        "station": {"X-API-Key": station_secret},
    }


@pytest.fixture()
def ref_client(ref_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(ref_settings)) as client:
        yield client


def enrol(
    client: TestClient, headers: dict[str, str], seeds: list[int], product: str = "acme", **form: str
) -> Any:
    files = [("files", (f"ref-{seed}.png", noise_png(seed), "image/png")) for seed in seeds]
    data = {"product": product, "modality": "photo", **form}
    return client.post("/v1/references", files=files, data=data, headers=headers)


def test_admin_enrols_lists_and_removes_a_station_cannot(
    ref_client: TestClient, keys: dict[str, Any]
) -> None:
    response = enrol(ref_client, keys["admin"], [1, 2, 3])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": MODEL, "version": "1"} and body["product"] == "acme"
    assert [r["status"] for r in body["results"]] == ["added"] * 3
    assert body["calibration"]["status"] == "abstains" and body["calibration"]["references"] == 3
    assert_error(enrol(ref_client, keys["station"], [4]), 403, "forbidden")
    assert_error(enrol(ref_client, {}, [4]), 401, "unauthorized")
    assert_error(ref_client.get("/v1/references?modality=photo", headers=keys["station"]), 403)

    listing = ref_client.get("/v1/references?modality=photo", headers=keys["admin"]).json()
    assert [(p["product"], p["references"]) for p in listing["products"]] == [("acme", 3)]
    one = ref_client.get(f"/v1/references?model={MODEL}&product=acme", headers=keys["admin"]).json()
    assert [r["source"] for r in one["references"]] == ["ref-1.png", "ref-2.png", "ref-3.png"]
    assert {(r["actor"], r["role"]) for r in one["references"]} == {(keys["admin_id"], "admin")}
    target = one["references"][0]["reference_id"]

    assert_error(ref_client.delete(f"/v1/references/{target}?modality=photo", headers=keys["station"]), 403)
    removed = ref_client.delete(f"/v1/references/{target}?modality=photo", headers=keys["admin"])
    assert removed.status_code == 200, removed.text
    assert removed.json()["removed"]["reference_id"] == target
    assert removed.json()["calibration"]["references"] == 2
    assert_error(ref_client.delete(f"/v1/references/{target}?modality=photo", headers=keys["admin"]), 404)


def test_references_survive_restart_and_reload(ref_settings: Settings, keys: dict[str, Any]) -> None:
    with TestClient(create_app(ref_settings)) as client:
        assert enrol(client, keys["admin"], [1, 2, 3, 4, 5]).json()["calibration"]["status"] == "calibrated"
    with TestClient(create_app(ref_settings)) as client:  # a restart
        url = "/v1/references?modality=photo&product=acme"
        before = client.get(url, headers=keys["admin"]).json()
        assert before["calibration"]["references"] == 5 and before["calibration"]["threshold"] is not None
        assert client.post("/v1/models/reload", headers=keys["admin"]).status_code == 200
        after = client.get(url, headers=keys["admin"]).json()
        assert after["references"] == before["references"]
        assert after["calibration"]["threshold"] == pytest.approx(before["calibration"]["threshold"])


def test_the_audit_log_says_who_enrolled_and_removed_what(
    ref_client: TestClient, ref_settings: Settings, keys: dict[str, Any]
) -> None:
    added = enrol(ref_client, keys["admin"], [7]).json()["results"][0]
    ref_client.delete(f"/v1/references/{added['reference_id']}?modality=photo", headers=keys["admin"])
    events = ref_client.app.state.audit.reference_events(MODEL)  # type: ignore[attr-defined]
    assert [(e.action, e.product, e.reference_id, e.actor, e.role) for e in events] == [
        ("add", "acme", added["reference_id"], keys["admin_id"], "admin"),
        ("remove", "acme", added["reference_id"], keys["admin_id"], "admin"),
    ]
    assert events[0].image_sha256 == added["sha256"] and events[0].source == "ref-7.png"


class FailingReferenceAudit:
    """The real store, except that reference events cannot be written."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def record_reference_event(self, event: ReferenceEvent) -> None:
        raise AuditError("disk full")

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_failing_audit_log_is_503_and_changes_nothing(
    ref_client: TestClient, ref_settings: Settings, keys: dict[str, Any]
) -> None:
    kept = enrol(ref_client, keys["admin"], [1]).json()["results"][0]["reference_id"]
    ref_client.app.state.audit = FailingReferenceAudit(ref_client.app.state.audit)  # type: ignore[attr-defined]
    response = enrol(ref_client, keys["admin"], [2])
    assert_error(response, 503, "audit_unavailable")
    assert response.headers["retry-after"]
    assert_error(ref_client.delete(f"/v1/references/{kept}?modality=photo", headers=keys["admin"]), 503)
    listing = ref_client.get("/v1/references?modality=photo&product=acme", headers=keys["admin"]).json()
    assert [r["reference_id"] for r in listing["references"]] == [kept]
    events = (ref_settings.references_dir / MODEL / "events.jsonl").read_text().splitlines()
    assert len(events) == 1


def test_refusals_are_clear_errors(ref_client: TestClient, keys: dict[str, Any]) -> None:
    admin = keys["admin"]
    assert_error(enrol(ref_client, admin, [1], product="Acme Watch"), 422, "invalid_product")
    no_model = ref_client.post(
        "/v1/references",
        files=[("files", ("a.png", noise_png(1), "image/png"))],
        data={"product": "acme"},
        headers=admin,
    )
    assert_error(no_model, 422, "model_required")
    assert_error(enrol(ref_client, admin, [1], model="nope"), 404, "unknown_model")
    plain = ref_client.post(
        "/v1/references",
        files=[("files", ("a.png", noise_png(1), "image/png"))],
        data={"product": "acme", "modality": "xray"},
        headers=admin,
    )
    assert_error(plain, 422, "no_embedding")
    bad = ref_client.post(
        "/v1/references",
        files=[("files", ("bad.png", b"not an image", "image/png"))],
        data={"product": "acme", "modality": "photo"},
        headers=admin,
    )
    assert "file 0: " in assert_error(bad, 422, "no_reference_added")["error"]["message"]
    mixed = ref_client.post(
        "/v1/references",
        files=[
            ("files", ("bad.png", b"not an image", "image/png")),
            ("files", ("ok.png", noise_png(1), "image/png")),
        ],
        data={"product": "acme", "modality": "photo"},
        headers=admin,
    )
    assert mixed.status_code == 200, mixed.text
    first, second = mixed.json()["results"]
    assert first["status"] == "refused" and first["error"]["code"] == "unsupported_media_type"
    assert second["status"] == "added"
    assert enrol(ref_client, admin, [1]).json()["results"][0]["status"] == "duplicate"
    conflict = enrol(ref_client, admin, [1, 2], product="other")
    assert conflict.json()["results"][0]["error"]["code"] == "reference_conflict"
    assert "'acme'" in conflict.json()["results"][0]["error"]["message"]
    assert_error(enrol(ref_client, admin, list(range(20))), 422, "too_many_files")
    unknown = assert_error(
        ref_client.get("/v1/references?modality=photo&product=nope", headers=admin), 404, "unknown_product"
    )
    assert "Known products: acme, other." in unknown["error"]["message"]
    assert_error(ref_client.get("/v1/references", headers=admin), 422, "model_required")
    assert_error(
        ref_client.delete("/v1/references/abc?modality=photo", headers=admin), 404, "unknown_reference"
    )


def test_uploads_over_the_batch_limit_are_413(tmp_path: Path) -> None:
    write_models(tmp_path)
    settings = make_settings(tmp_path, references_dir=tmp_path / "references", max_batch_bytes=64 * 1024)
    _, secret = KeyStore(settings.keys_file).add("ops", role="admin")
    with TestClient(create_app(settings)) as client:
        big = noise_png(1, size=(200, 200))  # about 120 KB of PNG
        response = client.post(
            "/v1/references",
            files=[("files", ("big.png", big, "image/png"))],
            data={"product": "acme", "modality": "photo"},
            headers={"X-API-Key": secret},
        )
        assert_error(response, 413)


def test_each_file_is_held_to_the_upload_limit(tmp_path: Path) -> None:
    write_models(tmp_path)
    settings = make_settings(tmp_path, references_dir=tmp_path / "references", max_upload_bytes=2048)
    _, secret = KeyStore(settings.keys_file).add("ops", role="admin")
    small = io.BytesIO()
    Image.new("RGB", (40, 48), (200, 10, 10)).save(small, format="PNG")
    with TestClient(create_app(settings)) as client:
        files = [
            ("files", ("big.png", noise_png(1), "image/png")),
            ("files", ("small.png", small.getvalue(), "image/png")),
        ]
        response = client.post(
            "/v1/references",
            files=files,
            data={"product": "acme", "modality": "photo"},
            headers={"X-API-Key": secret},
        )
        assert response.status_code == 200, response.text
        big, ok = response.json()["results"]
        assert (big["status"], big["error"]["code"], ok["status"]) == ("refused", "file_too_large", "added")


def write_config(root: Path) -> Path:
    config = root / "verity.env"
    config.write_text(
        f"VERITY_MODELS_DIR={root / 'models'}\nVERITY_AUDIT_DB={root / 'audit.sqlite'}\n"
        f"VERITY_REFERENCES_DIR={root / 'references'}\n"
    )
    return config


def test_cli_add_list_remove_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_models(tmp_path)
    config = str(write_config(tmp_path))
    images = tmp_path / "genuine" / "nested"
    images.mkdir(parents=True)
    for seed in range(3):
        (images / f"g{seed}.png").write_bytes(noise_png(seed))
    (images / "notes.txt").write_text("not an image, and not picked up")
    model = str(tmp_path / "models" / MODEL)
    base = ["--model", model, "--config", config]

    assert (
        refs_main(["add", *base, "--product", "acme", "--who", "brand-team", str(tmp_path / "genuine")]) == 0
    )
    out = capsys.readouterr().out
    assert out.count(": added ") == 3 and "the check abstains: 3 of 5 references" in out
    assert (
        refs_main(["add", "--model", MODEL, "--config", config, "--product", "acme", str(images / "g0.png")])
        == 0
    )
    assert ": duplicate " in capsys.readouterr().out  # the model found by name in the models dir
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    assert refs_main(["add", *base, "--product", "acme", str(bad), str(images / "g1.png")]) == 1
    assert "bad.png: refused: " in capsys.readouterr().out
    assert refs_main(["add", *base, "--product", "Bad Name", str(images)]) == 2
    assert refs_main(["add", *base, "--product", "acme", str(tmp_path / "missing")]) == 2
    assert (
        refs_main(["add", "--model", "no-such-model", "--config", config, "--product", "acme", str(images)])
        == 2
    )
    plain = ["--model", str(tmp_path / "models" / "xray-plain"), "--config", config]
    assert refs_main(["add", *plain, "--product", "acme", str(images)]) == 1
    assert "has no embedding output" in capsys.readouterr().err
    assert refs_main(["list", *plain]) == 0  # nothing enrolled for it, and no traceback
    assert "No genuine references for model xray-plain" in capsys.readouterr().out

    assert refs_main(["list", *base, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(p["product"], p["references"]) for p in listed["products"]] == [("acme", 3)]
    assert refs_main(["list", *base, "--product", "acme", "--json"]) == 0
    references = json.loads(capsys.readouterr().out)["references"]
    assert {r["actor"] for r in references} == {"cli:brand-team"}
    assert refs_main(["list", *base, "--product", "nope"]) == 1
    assert "Known products: acme." in capsys.readouterr().err

    target = references[0]["reference_id"]
    assert verity_main(["refs", "remove", *base, "--who", "brand-team", target]) == 0
    assert refs_main(["remove", *base, target]) == 1
    events = SQLiteAuditStore(tmp_path / "audit.sqlite").reference_events(MODEL)
    assert [e.action for e in events] == ["add"] * 3 + ["remove"]
    assert {(e.actor, e.role) for e in events} == {("cli:brand-team", "admin")}


def test_a_server_sees_cli_enrolments_without_restart(ref_settings: Settings, keys: dict[str, Any]) -> None:
    tmp = Path(ref_settings.audit_db).parent
    config = write_config(tmp)
    with TestClient(create_app(ref_settings)) as client:
        enrol(client, keys["admin"], [1, 2])
        folder = tmp / "cli-images"
        folder.mkdir()
        (folder / "g9.png").write_bytes(noise_png(9))
        assert (
            refs_main(["add", "--model", MODEL, "--config", str(config), "--product", "acme", str(folder)])
            == 0
        )
        listing = client.get("/v1/references?modality=photo&product=acme", headers=keys["admin"]).json()
        assert len(listing["references"]) == 3 and listing["calibration"]["references"] == 3


def test_v2_answers_the_reference_check_as_v1_does(ref_client: TestClient, keys: dict[str, Any]) -> None:
    """A product named in an Open Inference Protocol request: its reference check comes back as
    outputs, the same as /v1/predict's `reference` for the same image."""
    import base64

    assert enrol(ref_client, keys["admin"], list(range(1, 11))).status_code == 200
    image = noise_png(99)
    form = {"modality": "photo", "product": "acme"}
    station = keys["station"]
    v1 = ref_client.post("/v1/predict", files={"file": ("x.png", image)}, data=form, headers=station).json()
    request = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                           "data": [base64.b64encode(image).decode()]}],
               "parameters": {"product": "acme"}}  # fmt: skip
    v2 = ref_client.post(f"/v2/models/{MODEL}/infer", json=request, headers=keys["station"])
    assert v2.status_code == 200, v2.text
    outputs = {o["name"]: o["data"][0] for o in v2.json()["outputs"]}
    reference = v1["reference"]
    assert outputs["reference_status"] == reference["status"]
    for name in ("distance", "threshold"):
        expected = -1.0 if reference[name] is None else reference[name]
        assert abs(outputs[f"reference_{name}"] - expected) <= 1e-4
    # Every output named at once, the reference check's among them.
    every = [{"name": name} for name in output_names(open_set=False, product=True)]
    named = ref_client.post(f"/v2/models/{MODEL}/infer", json={**request, "outputs": every}, headers=station)
    assert named.status_code == 200, named.text
    assert [o["name"] for o in named.json()["outputs"]] == [o["name"] for o in every]
    # Without a product: no reference outputs, and asking for one says what this request has.
    del request["parameters"]
    plain = ref_client.post(f"/v2/models/{MODEL}/infer", json=request, headers=keys["station"]).json()
    assert not {o["name"] for o in plain["outputs"]} & {"reference_status", "reference_distance"}
    request["outputs"] = [{"name": "reference_status"}]
    refused = ref_client.post(f"/v2/models/{MODEL}/infer", json=request, headers=keys["station"])
    assert refused.status_code == 400 and "reference_status" in refused.json()["error"]
