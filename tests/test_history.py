"""The inspection console's server side (issue 15): GET /v1/history and its scope, who received each
verdict (audit key_id and caller_role), the unsure confirmation, view_png, serving the console's files
with their CSP, and the numbers in error details."""

from __future__ import annotations

import base64
import io
import sqlite3
import zipfile
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import (
    DARK,
    assert_error,
    build_wheel,
    image_bytes,
    make_settings,
    predict,
    write_model,
)
from fastapi.testclient import TestClient
from PIL import Image

from verity.api.app import FORM_OVERHEAD, _console_file, create_app
from verity.api.audit import AuditRecord, SQLiteAuditStore
from verity.api.auth import KeyStore
from verity.api.errors import ApiError
from verity.api.feedback import export_confirmed
from verity.api.middleware import CONSOLE_CSP

REPO = Path(__file__).resolve().parents[1]


def keys(root: Path) -> dict[str, str]:
    """Secrets of station keys gate-a and gate-b and an admin key (station hq)."""
    store = KeyStore(root / "keys.json")
    return {
        name: store.add(station, role=role)[1]
        for name, station, role in (
            ("a", "gate-a", "station"),
            ("b", "gate-b", "station"),
            ("admin", "hq", "admin"),
        )
    }


def auth(secret: str | None) -> dict[str, str] | None:
    return {"X-API-Key": secret} if secret else None


def history(client: TestClient, secret: str | None = None, **params: object):
    return client.get("/v1/history", params={k: str(v) for k, v in params.items()}, headers=auth(secret))


def ids(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [item["request_id"] for item in response.json()["items"]]


def receivers(db: Path) -> dict[str, tuple]:
    with sqlite3.connect(db) as connection:
        rows = connection.execute("SELECT request_id, station_id, key_id, caller_role FROM predictions")
        return {row[0]: row[1:] for row in rows}


V2_BODY = {
    "inputs": [
        {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(DARK).decode()]}
    ]
}


def test_a_station_sees_only_its_own_verdicts_and_an_admin_sees_all(tmp_path: Path, models_dir: Path) -> None:
    secrets = keys(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    with TestClient(create_app(settings)) as client:
        a = [predict(client, headers=auth(secrets["a"])).json()["request_id"] for _ in range(2)]
        b = [predict(client, headers=auth(secrets["b"]), case_id="SEZ-1").json()["request_id"]]
        batch = client.post(
            "/v1/predict/batch",
            files=[("files", ("1.png", DARK, "image/png")), ("files", ("2.png", DARK, "image/png"))],
            data={"modality": "photo"},
            headers=auth(secrets["b"]),
        ).json()
        b += [item["result"]["request_id"] for item in batch["results"]]
        v2 = client.post("/v2/models/photo-test/infer", json=V2_BODY, headers=auth(secrets["b"]))
        assert v2.status_code == 200, v2.text
        b.append(v2.headers["x-request-id"])  # one image: its audit row has the request's id

        assert set(ids(history(client, secrets["a"]))) == set(a)
        assert set(ids(history(client, secrets["b"]))) == set(b)
        assert set(ids(history(client, secrets["admin"]))) == set(a + b)
        assert set(ids(history(client, secrets["admin"], station_id="gate-b"))) == set(b)
        assert set(ids(history(client, secrets["a"], station_id="gate-a"))) == set(a)
        assert_error(history(client, secrets["a"], station_id="gate-b"), 403, "forbidden")
        assert_error(history(client), 401, "unauthorized")
        assert_error(history(client, "vk_nope_nope"), 401, "unauthorized")

        # One record: the same scope, and another station's verdict is the 404 of an unknown id.
        one = client.get(f"/v1/history/{b[0]}", headers=auth(secrets["b"]))
        assert one.status_code == 200 and one.json()["case_id"] == "SEZ-1"
        assert one.json() == next(
            i for i in history(client, secrets["b"]).json()["items"] if i["request_id"] == b[0]
        )
        assert client.get(f"/v1/history/{b[0]}", headers=auth(secrets["admin"])).status_code == 200
        hidden = assert_error(
            client.get(f"/v1/history/{b[0]}", headers=auth(secrets["a"])), 404, "unknown_request_id"
        )
        unknown = assert_error(client.get(f"/v1/history/{'f' * 32}", headers=auth(secrets["a"])), 404)
        assert hidden["error"]["message"].replace(b[0], "ID") == unknown["error"]["message"].replace(
            "f" * 32, "ID"
        )
        assert_error(client.get(f"/v1/history/{b[0]}"), 401)

    # Every route that answers a verdict recorded who received it: /v1, the batch and /v2.
    rows = receivers(settings.audit_db)
    key_ids = {key.station_id: key.key_id for key in KeyStore(settings.keys_file).list_keys()}
    assert {rows[i] for i in a} == {("gate-a", key_ids["gate-a"], "station")}
    assert {rows[i] for i in b} == {("gate-b", key_ids["gate-b"], "station")}
    assert len(b) == 4


def test_history_item_fields(client: TestClient) -> None:
    answer = predict(client, station_id="gate-3", case_id="SEZ-9").json()
    (item,) = history(client).json()["items"]
    assert set(item) == {
        "request_id",
        "created",
        "station_id",
        "case_id",
        "product",
        "modality",
        "verdict",
        "score",
        "thresholds",
        "recognised",
        "novelty",
        "reasons",
        "model",
        "reference_status",
        "reference_distance",
        "reference_threshold",
        "image_sha256",
        "api",
        "caller_role",
        "key_id",
        "feedback",
    }
    for name in (
        "request_id",
        "station_id",
        "case_id",
        "product",
        "modality",
        "verdict",
        "score",
        "thresholds",
        "recognised",
        "novelty",
        "reasons",
        "model",
        "image_sha256",
    ):
        assert item[name] == answer[name], name
    assert item["api"] == "v1" and item["feedback"] is None and item["reference_status"] is None
    assert item["caller_role"] == "anonymous" and item["key_id"] is None
    assert item["created"].endswith("+00:00")


def test_anonymous_history_holds_only_verdicts_received_anonymously(client: TestClient, settings) -> None:
    """On an unkeyed server (make serve) the console has no key: it sees the verdicts received without
    one, and a station name typed there never puts a verdict in that station's keyed history."""
    _, gate_a = KeyStore(settings.keys_file).add("gate-a")
    anonymous = [
        predict(client).json()["request_id"],
        predict(client, station_id="gate-a").json()["request_id"],
    ]
    keyed = predict(client, headers=auth(gate_a)).json()["request_id"]
    assert set(ids(history(client))) == set(anonymous)
    assert ids(history(client, station_id="gate-a")) == [anonymous[1]]  # a filter within its own
    assert ids(history(client, gate_a)) == [keyed]
    assert_error(client.get(f"/v1/history/{keyed}"), 404, "unknown_request_id")
    assert client.get(f"/v1/history/{anonymous[1]}").status_code == 200
    assert_error(client.get(f"/v1/history/{anonymous[1]}", headers=auth(gate_a)), 404)


def record(
    request_id: str,
    created: str,
    verdict: str = "genuine",
    recognised: bool | None = True,
    station: str | None = None,
    role: str | None = "anonymous",
) -> AuditRecord:
    return AuditRecord(
        request_id=request_id,
        created=created,
        station_id=station,
        case_id=None,
        image_sha256="ab" * 32,
        modality="photo",
        model_name="photo-test",
        model_version="2",
        score=0.5,
        verdict=verdict,
        alarm_threshold=0.6,
        clear_threshold=0.4,
        latency_ms=1.0,
        recognised=recognised,
        reasons="" if verdict == "genuine" else "classifier",
        caller_role=role,
    )


def test_paging_is_newest_first_without_duplicates(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path)
    store = SQLiteAuditStore(settings.audit_db)
    # Three records share each second: the request id breaks the tie, so no page repeats or skips one.
    records = [record(f"r{i:02d}", f"2026-11-29T10:00:{i // 3:02d}.000000+00:00") for i in range(45)]
    store.record(records[::2])
    store.record(records[1::2])
    store.record([record("keyed", "2026-11-29T11:00:00.000000+00:00", station="gate-a", role="station")])
    store.close()
    expected = [r.request_id for r in sorted(records, key=lambda r: (r.created, r.request_id), reverse=True)]
    pages, cursor = [], None
    with TestClient(create_app(settings)) as client:
        while True:
            params = {"before": cursor} if cursor else {}
            body = history(client, **params).json()
            assert body["limit"] == 20
            pages.append([item["request_id"] for item in body["items"]])
            cursor = body["next"]
            if cursor is None:
                break
        assert [len(page) for page in pages] == [20, 20, 5]
        assert sum(pages, []) == expected
        assert ids(history(client, limit=100)) == expected
        assert ids(history(client, limit=1)) == expected[:1]


def test_verdict_and_date_filters(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path)
    store = SQLiteAuditStore(settings.audit_db)
    store.record(
        [
            record("g28", "2026-11-28T23:59:59.999999+00:00", "genuine"),
            record("c29", "2026-11-29T00:00:00.000000+00:00", "counterfeit"),
            record("u29", "2026-11-29T12:00:00.000000+00:00", "uncertain", recognised=True),
            record("n29", "2026-11-29T23:59:59.999999+00:00", "uncertain", recognised=False),
            record(
                "o30", "2026-11-30T00:00:00.000000+00:00", "uncertain", recognised=None
            ),  # no novelty gate
        ]
    )
    store.close()
    with TestClient(create_app(settings)) as client:
        assert ids(history(client, verdict="genuine")) == ["g28"]
        assert ids(history(client, verdict="counterfeit")) == ["c29"]
        assert ids(history(client, verdict="uncertain")) == ["o30", "u29"]
        assert ids(history(client, verdict="not_recognised")) == ["n29"]
        # A date `until` includes its whole day; a datetime bound is itself included.
        assert ids(history(client, since="2026-11-29", until="2026-11-29")) == ["n29", "u29", "c29"]
        assert ids(history(client, until="2026-11-29T12:00:00Z")) == ["u29", "c29", "g28"]
        assert ids(history(client, since="2026-11-29T12:00:00")) == ["o30", "n29", "u29"]  # naive is UTC
        assert ids(history(client, since="2026-11-29T17:00:00+05:00")) == ["o30", "n29", "u29"]
        assert ids(history(client, since="2026-11-29", verdict="uncertain")) == ["o30", "u29"]
        assert ids(history(client, since="2026-12-01")) == []
        assert ids(history(client, until="20261128")) == ["g28"]  # a basic-format date is a whole day too


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 101},
        {"limit": "many"},
        {"verdict": "fake"},
        {"since": "yesterday"},
        {"until": "2026-13-01"},
        {"before": "not-a-cursor"},
        {"before": base64.urlsafe_b64encode(b"[1]").decode()},
        {"station_id": "s" * 101},
    ],
)
def test_bad_history_parameters_are_422_json(client: TestClient, params: dict) -> None:
    assert_error(history(client, **params), 422, "invalid_fields")


def test_bad_record_id_is_422_json(client: TestClient) -> None:
    assert_error(client.get(f"/v1/history/{'x' * 101}"), 422, "invalid_fields")


def confirm(
    client: TestClient, request_id: str, label: str, secret: str | None = None, notes: str | None = None
):
    body = {"request_id": request_id, "confirmed_label": label, "notes": notes}
    return client.post("/v1/feedback", json=body, headers=auth(secret))


def test_feedback_shows_in_history_and_unsure_is_never_training_data(
    tmp_path: Path, models_dir: Path
) -> None:
    secrets = keys(tmp_path)
    settings = make_settings(tmp_path, require_api_keys=True)
    with TestClient(create_app(settings)) as client:
        unsure, seized, overruled = (
            predict(client, image_bytes(v), headers=auth(secrets["b"])).json()["request_id"]
            for v in (10, 90, 170)
        )
        assert confirm(client, unsure, "counterfeit", secrets["b"]).status_code == 200
        response = confirm(client, unsure, "unsure", secrets["b"], notes="<b>smudged</b> label")
        assert response.status_code == 200 and response.json()["confirmed_label"] == "unsure"
        assert confirm(client, seized, "counterfeit", secrets["b"]).status_code == 200
        assert confirm(client, overruled, "counterfeit", secrets["b"]).status_code == 200
        assert confirm(client, overruled, "genuine", secrets["admin"]).status_code == 200
        assert_error(confirm(client, seized, "maybe", secrets["b"]), 422)
        items = {item["request_id"]: item for item in history(client, secrets["b"]).json()["items"]}
        assert items[unsure]["feedback"]["confirmed_label"] == "unsure"  # the station's latest
        assert items[unsure]["feedback"]["notes"] == "<b>smudged</b> label"
        assert items[seized]["feedback"] == {
            "confirmed_label": "counterfeit",
            "created": items[seized]["feedback"]["created"],
            "notes": None,
            "station_id": "gate-b",
            "role": "station",
        }
        assert items[overruled]["feedback"]["confirmed_label"] == "genuine"  # the admin's wins
        assert items[overruled]["feedback"]["role"] == "admin"
        one = client.get(f"/v1/history/{unsure}", headers=auth(secrets["admin"])).json()
        assert one["feedback"]["confirmed_label"] == "unsure"
    store = SQLiteAuditStore(settings.audit_db)
    result = export_confirmed(store, tmp_path / "out")
    store.close()
    assert (result.written, result.unsure) == (2, 1)
    assert "skipped 1 confirmed as unsure (cannot tell): no label to train on" in result.summary()
    exported = (tmp_path / "out" / "confirmed.jsonl").read_text()
    assert unsure not in exported and seized in exported and "unsure" not in exported


def test_an_old_database_gains_the_receiver_columns(tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    store = SQLiteAuditStore(db)
    store.record([record("old", "2026-11-29T10:00:00.000000+00:00", role=None, station="gate-a")])
    store.close()
    with sqlite3.connect(db) as connection:  # as a database from before issue 15 would be
        connection.execute("ALTER TABLE predictions DROP COLUMN caller_role")
        connection.execute("ALTER TABLE predictions DROP COLUMN key_id")
    store = SQLiteAuditStore(db)
    SQLiteAuditStore(db).close()
    with sqlite3.connect(db) as connection:
        columns = [row[1] for row in connection.execute("PRAGMA table_info(predictions)")]
    assert columns[-2:] == ["key_id", "caller_role"] and columns.count("key_id") == 1
    old = store.get("old")
    store.close()
    assert old is not None and (old.key_id, old.caller_role) == (None, None)


def png_of(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def sixteen_bit(width: int, height: int) -> bytes:
    """A 16-bit grey PNG holding 12-bit values (0..4095): a horizontal ramp."""
    ramp = np.tile(np.linspace(0, 4095, width).astype(np.uint16), (height, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    return buffer.getvalue()


def test_view_png_is_the_heatmaps_size_and_a_dim_xray_is_not_black(client: TestClient) -> None:
    photo = predict(client, image_bytes(200), return_view="true", return_heatmap="true").json()
    view, heat = png_of(photo["view_png"]), png_of(photo["heatmap_png"])
    assert view.dtype == np.uint8 and view.shape == heat.shape == (32, 32, 3)
    assert abs(int(view.mean()) - 200) <= 1  # a photo is shown as the model saw it, not stretched
    assert predict(client).json()["view_png"] is None  # only when asked for

    scan = sixteen_bit(48, 40)
    raw = np.asarray(Image.open(io.BytesIO(scan)))
    assert raw.max() == 4095 and int(raw.max()) >> 8 < 16  # shown as 8 bits naively: all near black
    xray = predict(client, scan, modality="xray", return_view="true", return_heatmap="true").json()
    view, heat = png_of(xray["view_png"]), png_of(xray["heatmap_png"])
    assert view.shape == heat.shape == (32, 32, 3)
    content = view[4:28]  # letterboxed 48x40 -> 32x27: the rows inside the air padding
    assert content.min() <= 10 and content.max() >= 245 and content.std() > 50
    assert np.all(view[0] == 255)  # the letterbox padding is air, white
    alone = predict(client, scan, modality="xray", return_view="true").json()
    assert alone["heatmap_png"] is None and np.array_equal(png_of(alone["view_png"]), view)

    batch = client.post(
        "/v1/predict/batch",
        files=[("files", ("a.png", scan, "image/png")), ("files", ("b.txt", b"not an image", "text/plain"))],
        data={"modality": "xray", "return_view": "true"},
    ).json()["results"]
    assert np.array_equal(png_of(batch[0]["result"]["view_png"]), view) and batch[1]["error"]


def test_view_png_of_a_tiled_scan(tmp_path: Path, models_dir: Path) -> None:
    settings = make_settings(tmp_path, tile_scale=1.0, max_tiles=60)
    with TestClient(create_app(settings)) as client:
        answer = predict(
            client, sixteen_bit(600, 80), modality="xray", return_view="true", return_heatmap="true"
        )
        body = answer.json()
    assert body["tiles"] > 1
    view, heat = png_of(body["view_png"]), png_of(body["heatmap_png"])
    assert view.shape == heat.shape == (80, 600, 3)
    ramp = view[40, :, 0].astype(int)
    assert ramp[:20].mean() < 20 and ramp[-20:].mean() > 235 and np.all(np.diff(ramp) >= -2)


def console_files(root: Path) -> Path:
    folder = root / "console"
    (folder / "strings").mkdir(parents=True)
    (folder / "index.html").write_text("<!doctype html><title>Verity</title>")
    (folder / "app.js").write_text("export const ok = 1;")
    (folder / "style.css").write_text("body {}")
    (folder / "icon.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg'/>")
    (folder / "strings" / "ru.json").write_text("{}")
    (folder / ".secret.js").write_text("no")
    (folder / "tool.py").write_text("no")
    (root / "outside.js").write_text("no")
    return folder


def test_the_console_is_served_with_its_csp(tmp_path: Path, models_dir: Path, monkeypatch) -> None:
    folder = console_files(tmp_path / "pkg")
    monkeypatch.setattr("verity.api.app.console_dir", lambda: folder)
    settings = make_settings(tmp_path, require_api_keys=True)  # the page itself needs no key
    with TestClient(create_app(settings)) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"] == "text/html; charset=utf-8"
        assert "<title>Verity</title>" in page.text
        types = {
            "app.js": "text/javascript; charset=utf-8",
            "style.css": "text/css; charset=utf-8",
            "icon.svg": "image/svg+xml",
            "strings/ru.json": "application/json",
        }
        for name, media_type in types.items():
            response = client.get(f"/console/{name}")
            assert response.status_code == 200 and response.headers["content-type"] == media_type, name
        for response in (page, client.get("/console/app.js")):
            assert response.headers["content-security-policy"] == CONSOLE_CSP.decode()
            assert response.headers["permissions-policy"] == "camera=(self)"
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in CONSOLE_CSP.decode() and "unsafe" not in CONSOLE_CSP.decode()
        for name in ("x.js", ".secret.js", "tool.py", "../outside.js", "%2e%2e/outside.js", "strings"):
            assert_error(client.get(f"/console/{name}"), 404)
        for name in ("../outside.js", "strings/../../outside.js", "/etc/passwd"):  # as the route gets them
            with pytest.raises(ApiError):
                _console_file(name)
        api = history(client)
        assert api.status_code == 401 and api.headers["cache-control"] == "no-store"
        assert api.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
        assert_error(client.get("/", headers={"Host": "evil.example"}), 400, "invalid_host")


def test_openapi_documents_the_history(client: TestClient) -> None:
    document = client.get("/openapi.json").json()
    listing = document["paths"]["/v1/history"]["get"]
    assert listing["tags"] == ["history"]
    assert listing["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/HistoryPage"
    )
    assert {p["name"] for p in listing["parameters"]} == {
        "limit",
        "before",
        "verdict",
        "since",
        "until",
        "station_id",
    }
    one = document["paths"]["/v1/history/{request_id}"]["get"]
    assert one["responses"]["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/HistoryItem")
    assert "view_png" in document["components"]["schemas"]["PredictionResult"]["properties"]
    feedback = document["components"]["schemas"]["FeedbackIn"]["properties"]["confirmed_label"]
    assert feedback["enum"] == ["genuine", "counterfeit", "unsure"]
    assert "/" not in document["paths"] and not any(p.startswith("/console") for p in document["paths"])


def test_error_details_carry_the_numbers_a_page_shows(tmp_path: Path) -> None:
    write_model(tmp_path / "models", "photo-test", "1", "photo")  # no X-ray model: an X-ray is a 503
    settings = make_settings(tmp_path, max_upload_bytes=2048, rate_limit_per_s=0.5, rate_limit_burst=2)
    with TestClient(create_app(settings)) as client:
        body = client.post(
            "/v1/predict", content=b"x" * 100_000, headers={"content-type": "multipart/form-data"}
        )
        assert assert_error(body, 413, "request_too_large")["error"]["limit_bytes"] == 2048 + FORM_OVERHEAD
        large = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(large).save(buffer, format="PNG")
        assert len(buffer.getvalue()) > 2048
        file = assert_error(predict(client, buffer.getvalue()), 413, "image_too_large")
        assert file["error"]["limit_bytes"] == 2048
        unavailable = assert_error(predict(client, modality="xray"), 503, "no_model")
        assert unavailable["error"]["retry_after_s"] == settings.retry_after_s
        limited = assert_error(predict(client), 429, "rate_limited")
        assert limited["error"]["retry_after_s"] >= 1
        plain = assert_error(predict(client, b"not an image"), 429)  # still limited: no bytes number
        assert "limit_bytes" not in plain["error"]
    with TestClient(create_app(make_settings(tmp_path))) as client:
        refused = assert_error(predict(client, b"not an image"), 415)
        assert set(refused["error"]) == {"code", "message", "request_id"}
        assert set(assert_error(client.get("/v1/history/unknown"), 404)["error"]) == {
            "code",
            "message",
            "request_id",
        }


@pytest.mark.slow
def test_the_wheel_ships_the_console(tmp_path: Path) -> None:
    shipped = sorted(
        path.relative_to(REPO / "api").as_posix()
        for path in (REPO / "api" / "console").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and not path.name.startswith(".")
    )
    assert "console/index.html" in shipped
    assert any("/" in name.removeprefix("console/") for name in shipped), "a subfolder's files ship too"
    with zipfile.ZipFile(build_wheel(tmp_path)) as wheel:
        names = set(wheel.namelist())
    assert {f"verity/api/{name}" for name in shipped} <= names
