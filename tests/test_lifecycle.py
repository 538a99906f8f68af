"""Promote and roll back: a modality serves its model's `production` alias, set by a person with a reason
and recorded in the audit log; a new folder never goes live by itself once an alias exists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from api_fixtures import admin_headers, make_models_dir, make_settings, write_model
from fastapi.testclient import TestClient

from tests.test_weak_models import write_weak_model
from verity import cli as verity_cli
from verity.api.app import create_app
from verity.api.audit import SQLiteAuditStore
from verity.api.lifecycle_cli import LifecycleError, promote, rollback
from verity.api.settings import Settings


@pytest.fixture()
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    make_models_dir(tmp_path)
    settings = make_settings(tmp_path)
    monkeypatch.setenv("VERITY_MODELS_DIR", str(settings.models_dir))
    monkeypatch.setenv("VERITY_AUDIT_DB", str(settings.audit_db))
    return settings


def _defaults(client: TestClient, settings: Settings) -> dict[str, str]:
    client.post("/v1/models/reload", headers=admin_headers(settings))
    return client.get("/readyz").json()["defaults"]


def test_promote_and_roll_back_through_the_cli_and_the_server(cli_env: Settings, capsys) -> None:
    settings = cli_env
    with TestClient(create_app(settings)) as client:
        assert _defaults(client, settings)["photo"] == "photo-test/2"  # the newest, adopted as production
        assert verity_cli.main(["promote", "photo-test", "1", "--why", "version 2 alarms on tea"]) == 0
        assert _defaults(client, settings)["photo"] == "photo-test/1"
        listed = {(m["name"], m["version"]): m for m in client.get("/v1/models").json()["models"]}
        promoted = listed[("photo-test", "1")]
        assert promoted["aliases"] == ["production"] and promoted["default"]
        write_model(settings.models_dir, "photo-test", "3")  # a new folder: loaded, never live by itself
        assert _defaults(client, settings)["photo"] == "photo-test/1"
        assert verity_cli.main(["promote", "photo-test", "3", "--why", "retrained on November"]) == 0
        assert _defaults(client, settings)["photo"] == "photo-test/3"
        assert verity_cli.main(["rollback", "photo-test", "--why", "false alarms at gate 3"]) == 0
        assert _defaults(client, settings)["photo"] == "photo-test/1"
    store = SQLiteAuditStore(settings.audit_db)
    events = store.model_events("photo-test")
    store.close()
    assert [(e.action, e.version, e.previous_version) for e in events] == [
        ("adopt", "2", None), ("promote", "1", "2"), ("promote", "3", "1"), ("rollback", "1", "3"),
    ]
    assert events[0].actor == "verity serve" and "adopted at start" in (events[0].why or "")
    assert events[-1].why == "false alarms at gate 3" and events[1].actor.startswith("cli:")
    assert verity_cli.main(["promote", "--list"]) == 0
    assert "rollback photo-test production -> 1 (was 3)" in capsys.readouterr().out


def test_refusals_say_why(cli_env: Settings, tmp_path: Path, capsys) -> None:
    settings = cli_env
    store = SQLiteAuditStore(settings.audit_db)
    try:
        with pytest.raises(LifecycleError, match="No model photo-test/9"):
            promote(settings, store, "photo-test", "9", "typo")
        write_weak_model(settings.models_dir, "photo-test", "7")
        with pytest.raises(LifecycleError, match="marked weak"):
            promote(settings, store, "photo-test", "7", "shuffled labels")
        worse = {"challenger": {"model": "photo-test/2"}, "roc_auc_difference": -0.08,
                 "roc_auc_difference_interval": [-0.12, -0.04],
                 "worse_beyond_noise": True}  # fmt: skip
        (tmp_path / "compare.json").write_text(json.dumps(worse))
        shown = r"worse than the champion beyond noise.*\[-0.1200, -0.0400\]"  # with the interval
        with pytest.raises(LifecycleError, match=shown):
            promote(settings, store, "photo-test", "2", "better?", comparison=tmp_path / "compare.json")
        with pytest.raises(LifecycleError, match="compares photo-test/2, not photo-test/1"):
            promote(settings, store, "photo-test", "1", "mixed up", comparison=tmp_path / "compare.json")
        with pytest.raises(LifecycleError, match="no earlier production version"):
            rollback(store, "photo-test", "nothing yet")
        forced = promote(settings, store, "photo-test", "2", "the old one broke", force=True,
                         comparison=tmp_path / "compare.json")  # fmt: skip
        assert forced.comparison and json.loads(forced.comparison)["worse_beyond_noise"]
    finally:
        store.close()
    assert verity_cli.main(["promote", "photo-test", "9", "--why", "typo"]) == 1
    assert "refused: No model photo-test/9" in capsys.readouterr().err


def test_clients_may_name_a_model_a_version_or_an_alias(cli_env: Settings) -> None:
    from api_fixtures import DARK, assert_error

    settings = cli_env
    assert verity_cli.main(["promote", "photo-test", "1", "--why", "the tested one"]) == 0
    with TestClient(create_app(settings)) as client:

        def answered_by(**fields: str) -> str:
            response = client.post("/v1/predict", files={"file": ("a.png", DARK)}, data=fields)
            assert response.status_code == 200, response.text
            return "{name}/{version}".format(**response.json()["model"])

        assert answered_by(modality="photo") == "photo-test/1"  # the production alias serves the modality
        aliases = client.post("/v1/predict", files={"file": ("a.png", DARK)}, data={"model": "photo-test/2"})
        assert aliases.json()["model_aliases"] == []
        promoted = client.post("/v1/predict", files={"file": ("a.png", DARK)}, data={"modality": "photo"})
        assert promoted.json()["model_aliases"] == ["production"]
        assert answered_by(model="photo-test@production") == "photo-test/1"
        assert answered_by(model="photo-test/2", modality="photo") == "photo-test/2"
        assert answered_by(model="photo-test") == "photo-test/1"
        assert answered_by(model="xray") == "xray-test/1"
        raw = client.post("/v1/predict?model=photo-test@production", content=DARK,
                          headers={"Content-Type": "image/png"})  # fmt: skip
        assert raw.json()["model"] == {"name": "photo-test", "version": "1"}
        def sent(**fields: str):  # noqa: ANN202 - the response
            return client.post("/v1/predict", files={"file": ("a.png", DARK)}, data=fields)

        wrong = sent(model="xray-test", modality="photo")
        assert "xray model, not photo" in assert_error(wrong, 422)["error"]["message"]
        unknown = sent(model="photo-test@challenger")
        assert "photo-test/1" in assert_error(unknown, 404, "unknown_model")["error"]["message"]
        assert_error(sent(model="m" * 200), 422)
        meta = client.get("/v2/models/photo-test@production")
        assert meta.status_code == 200 and meta.json()["name"] == "photo-test"
        assert client.get("/v2/models/photo-test@challenger").status_code == 404


def test_a_promotion_embeds_the_references_for_the_new_version_first(cli_env: Settings) -> None:
    from api_fixtures import image_bytes

    from benchmarks.models import tiny_card, tiny_onnx, tiny_spec
    from verity.inference.engine import OnnxEngine
    from verity.inference.references.check import embed_image
    from verity.inference.references.store import ReferenceStore

    settings = cli_env
    spec = tiny_spec("photo")
    for version in ("1", "2"):
        card = tiny_card(spec, "photo-emb", version)
        path = settings.models_dir / "photo-emb" / version / "model.onnx"
        tiny_onnx(path, spec, card, features=8, embedding=True, seed=int(version))
    references = ReferenceStore(settings.references_dir)
    first = OnnxEngine(settings.models_dir / "photo-emb" / "1" / "model.onnx", warmup=False)
    for value in range(40, 240, 40):
        references.add("photo-emb", "velmor-tea", image_bytes(value), source=None, actor="test", role="admin",
                       embed=lambda data: embed_image(first, data))  # fmt: skip
    cached = settings.references_dir / "photo-emb" / "embeddings"
    before = set(cached.glob("*.npz"))
    store = SQLiteAuditStore(settings.audit_db)
    try:
        promote(settings, store, "photo-emb", "2", "retrained")
    finally:
        store.close()
    assert len(set(cached.glob("*.npz")) - before) == 1  # version 2's embeddings, written before it went live


def test_an_admin_sees_where_each_model_stands(cli_env: Settings) -> None:
    from api_fixtures import DARK, assert_error

    from verity.api.auth import KeyStore

    settings = cli_env
    _, station = KeyStore(settings.keys_file).add("gate-1", role="station")
    comparison = {"images": 40, "roc_auc_difference": 0.02, "roc_auc_difference_interval": [-0.01, 0.05],
                  "confidence": 0.95, "verdict_changes": 0.05, "worse_beyond_noise": False,
                  "better_beyond_noise": False, "verdict_change_examples": []}  # fmt: skip
    (settings.models_dir / "photo-test" / "2" / "compare.json").write_text(json.dumps(comparison))
    (settings.models_dir / "xray-test" / "1" / "compare.json").write_text("{not json")
    with TestClient(create_app(settings)) as client:
        client.post("/v1/predict", files={"file": ("a.png", DARK)}, data={"modality": "photo"})
        assert verity_cli.main(["promote", "photo-test", "1", "--why", "the tested one"]) == 0
        callers = [client.get("/v1/models", headers=h).json()["caller"]
                   for h in (admin_headers(settings), {"X-API-Key": station})]  # fmt: skip
        client.post("/v1/models/reload", headers=admin_headers(settings))
        body = client.get("/v1/lifecycle", headers=admin_headers(settings)).json()
        assert_error(client.get("/v1/lifecycle", headers={"X-API-Key": station}), 403)
        assert_error(client.get("/v1/lifecycle"), 401)
    models = {model["name"]: model for model in body["models"]}
    photo = models["photo-test"]
    assert photo["aliases"] == {"production": "1"} and photo["serving"] == ["photo-test/1"]
    assert photo["versions"] == ["1", "2"] and [e["action"] for e in photo["events"]] == ["adopt", "promote"]
    assert body["shadow"]["model"] is None and body["shadow"]["answers"] == 0
    # Each loaded version with its comparison against production (compare.json beside it); a file that
    # does not read as one is shown as none, never an error.
    loaded = {entry["version"]: entry for entry in photo["loaded"]}
    assert loaded["1"]["comparison"] is None and loaded["1"]["aliases"] == ["production"]
    brief = loaded["2"]["comparison"]
    assert brief["roc_auc_difference"] == 0.02 and brief["images"] == 40
    assert "verdict_change_examples" not in brief  # the panel's figures, not the whole report
    assert models["xray-test"]["loaded"][0]["comparison"] is None
    # /v1/models says who asked: the console offers its models panel to an admin only.
    assert callers == [{"station_id": "ops", "role": "admin", "products": []},
                       {"station_id": "gate-1", "role": "station", "products": []}]
    assert isinstance(body["drift"], list)
