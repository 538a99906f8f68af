"""API keys in-process: who may call what, stations recorded as themselves, the keys CLI, serve's refusal."""

from __future__ import annotations

import base64
import sqlite3
import time
from pathlib import Path

import pytest
from api_fixtures import DARK, assert_error, make_settings, predict
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.api.auth import KeyStore
from verity.api.cli import keys_main


def test_every_route_records_a_keyed_station_as_itself(tmp_path: Path, models_dir: Path) -> None:
    """One rule on /v1 and /v2: a station key naming another station is refused, never replaced."""
    store = KeyStore(tmp_path / "keys.json")
    _, station_key = store.add("gate-3")
    headers = {"X-API-Key": station_key}
    image = base64.b64encode(DARK).decode()
    infer = {"inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": [image, image]}]}
    with TestClient(create_app(make_settings(tmp_path, require_api_keys=True))) as client:
        route = "/v2/models/photo-test/infer"
        other = client.post(route, json={**infer, "parameters": {"station_id": "gate-9"}}, headers=headers)
        assert other.status_code == 403 and "gate-3" in other.json()["error"]  # OIP errors: {"error": text}
        own = client.post(route, json={**infer, "parameters": {"station_id": "gate-3"}}, headers=headers)
        assert own.status_code == 200, own.text
        batch = client.post(
            "/v1/predict/batch", files=[("files", ("a.png", DARK)), ("files", ("b.png", DARK))],
            data={"modality": "photo", "station_id": "gate-9"}, headers=headers,
        )  # fmt: skip
        assert_error(batch, 403, "forbidden")
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        stations = {row[0] for row in db.execute("SELECT station_id FROM predictions")}
    assert stations == {"gate-3"}


def test_auth_required(tmp_path: Path, models_dir: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, station_key = store.add("gate-3")
    _, admin_key = store.add("hq", role="admin")
    with TestClient(create_app(make_settings(tmp_path, require_api_keys=True))) as client:
        assert client.get("/healthz").status_code == 200
        assert_error(predict(client), 401, "unauthorized")
        assert_error(predict(client, headers={"X-API-Key": "vk_nope_nope"}), 401)
        assert_error(client.get("/v1/models"), 401)
        ok = predict(client, headers={"X-API-Key": station_key})
        assert ok.status_code == 200 and ok.json()["station_id"] == "gate-3"
        bearer = predict(client, headers={"Authorization": f"Bearer {station_key}"})
        assert bearer.status_code == 200
        assert_error(
            predict(client, headers={"X-API-Key": station_key}, station_id="gate-9"), 403, "forbidden"
        )
        assert_error(client.post("/v1/models/reload", headers={"X-API-Key": station_key}), 403, "forbidden")
        assert client.post("/v1/models/reload", headers={"X-API-Key": admin_key}).status_code == 200
        # Revoked with the CLI, refused at once, no restart.
        key_id = station_key.split("_")[1]
        assert keys_main(["--keys-file", str(tmp_path / "keys.json"), "revoke", key_id]) == 0
        time.sleep(0.01)
        assert_error(predict(client, headers={"X-API-Key": station_key}), 401)


def test_auth_off_allows_anonymous_predictions_but_checks_presented_keys(client: TestClient) -> None:
    assert predict(client).status_code == 200
    assert_error(predict(client, headers={"X-API-Key": "vk_bad_key"}), 401)
    # An anonymous caller is never admin, even on an unkeyed loopback server (tests/test_exposure.py).
    assert_error(client.post("/v1/models/reload"), 401, "unauthorized")


def test_keys_cli_add_list(tmp_path: Path, capsys) -> None:
    keys_file = str(tmp_path / "k.json")
    assert keys_main(["--keys-file", keys_file, "add", "--station", "gate-1"]) == 0
    secret = capsys.readouterr().out.strip()
    assert secret.startswith("vk_") and secret not in (tmp_path / "k.json").read_text()
    assert KeyStore(keys_file).verify(secret).station_id == "gate-1"
    assert keys_main(["--keys-file", keys_file, "list"]) == 0
    assert "gate-1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="Known key ids"):
        keys_main(["--keys-file", keys_file, "revoke", "deadbeef"])


def test_broken_key_file_keeps_previous_keys(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    _, secret = store.add("gate-1")
    assert store.verify(secret) is not None
    time.sleep(0.01)
    (tmp_path / "keys.json").write_text("{ this is not json")
    assert store.verify(secret) is not None  # still the keys it had, no exception
    assert store.verify("vk_x_y") is None


def test_serve_refuses_non_loopback_without_keys(tmp_path: Path, monkeypatch, capsys) -> None:
    from verity.api.cli import is_loopback, serve_main

    monkeypatch.setenv("VERITY_KEYS_FILE", str(tmp_path / "keys.json"))
    assert serve_main(["--host", "0.0.0.0", "--port", "1"]) == 2
    assert "refusing to start" in capsys.readouterr().err
    assert serve_main(["--host", "127.0.0.1", "--require-api-keys"]) == 2
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.5") and not is_loopback("example.org")
