"""/v1/predict with the image as the whole body (Content-Type: image/*), options in the query, as
scanner SDKs and BentoML clients send it: the same answer and audit row as the multipart form."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import BRIGHT, DARK, assert_error, audit_rows, image_bytes, predict
from fastapi.testclient import TestClient
from PIL import Image


def _raw(client: TestClient, data: bytes, query: str, kind: str = "image/png"):
    return client.post(f"/v1/predict?{query}", content=data, headers={"Content-Type": kind})


def test_a_raw_body_answers_as_the_form_does(client: TestClient, tmp_path: Path) -> None:
    for data in (DARK, BRIGHT):
        form = predict(client, data, station_id="gate-3", case_id="SEZ-9").json()
        raw = _raw(client, data, "modality=photo&station_id=gate-3&case_id=SEZ-9")
        assert raw.status_code == 200, raw.text
        body = raw.json()
        assert abs(body["score"] - form["score"]) <= 1e-4
        for field in ("verdict", "reasons", "image_sha256", "model", "station_id", "case_id", "recognised"):
            assert body[field] == form[field], field
        assert audit_rows(tmp_path)[body["request_id"]][1] == body["verdict"]  # audited like any verdict


@pytest.mark.parametrize("kind", ["image/jpeg", "image/png; charset=binary", "application/octet-stream"])
def test_the_body_is_decoded_by_content_whatever_its_type_says(client: TestClient, kind: str) -> None:
    grey = image_bytes(90, mode="L")
    response = _raw(client, grey, "modality=xray&return_heatmap=true", kind)
    assert response.status_code == 200, response.text
    assert response.json()["model"]["name"] == "xray-test" and response.json()["heatmap_png"]


def test_a_sixteen_bit_tiff_body(client: TestClient) -> None:
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40), 30000, np.uint16)).save(buffer, format="TIFF")
    response = _raw(client, buffer.getvalue(), "modality=xray", "image/tiff")
    assert response.status_code == 200, response.text


def _message(response, status: int, code: str | None = None) -> str:
    return assert_error(response, status, code)["error"]["message"]


def test_bad_raw_requests_get_clear_errors(client: TestClient) -> None:
    assert "modality" in _message(_raw(client, DARK, ""), 422, "invalid_fields")
    assert "modality" in _message(_raw(client, DARK, "modality=sonar"), 422)
    assert "colour" in _message(_raw(client, DARK, "modality=photo&colour=red"), 422)  # no silent extras
    assert "case_id" in _message(_raw(client, DARK, "modality=photo&case_id=" + "x" * 300), 422)
    assert "return_view" in _message(_raw(client, DARK, "modality=photo&return_view=maybe"), 422)
    assert_error(_raw(client, b"not an image", "modality=photo"), 415)
    assert_error(_raw(client, b"", "modality=photo"), 400)
    no_file = client.post("/v1/predict", data={"modality": "photo"})
    assert "file" in _message(no_file, 422, "invalid_fields")
    no_modality = client.post("/v1/predict", files={"file": ("a.png", DARK)})
    assert "modality" in _message(no_modality, 422)


def test_a_raw_body_from_another_origin_is_refused(client: TestClient, tmp_path: Path) -> None:
    before = len(audit_rows(tmp_path))
    headers = {"Content-Type": "image/png", "Origin": "https://evil.example"}
    response = client.post("/v1/predict?modality=photo", content=DARK, headers=headers)
    assert_error(response, 403)
    assert len(audit_rows(tmp_path)) == before


def _encoded(pixels: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def test_the_bytes_decide_the_modality_where_they_can() -> None:
    from verity.datasets.encode import encode_dicom
    from verity.inference.decode import content_modality

    deep = np.full((30, 40), 30000, np.uint16)
    assert content_modality(encode_dicom(deep)) == "xray"
    assert content_modality(_encoded(deep, "PNG")) == "xray"
    assert content_modality(_encoded(deep, "TIFF")) == "xray"
    grey, colour = np.zeros((30, 40), np.uint8), np.zeros((30, 40, 3), np.uint8)
    eight_bit = [_encoded(grey, "PNG"), _encoded(colour, "JPEG"), _encoded(grey, "TIFF")]
    for undecided in (*eight_bit, b"", b"not an image", b"\x89PNG\r\n"):
        assert content_modality(undecided) is None


def test_a_dicom_or_sixteen_bit_upload_needs_no_modality(client: TestClient, tmp_path: Path) -> None:
    from verity.datasets.encode import encode_dicom

    deep = np.full((40, 40), 30000, np.uint16)
    form = client.post("/v1/predict", files={"file": ("scan.dcm", encode_dicom(deep))})
    raw = _raw(client, _encoded(deep, "TIFF"), "", "image/tiff")
    for response in (form, raw):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["modality"] == "xray" and body["model"]["name"] == "xray-test"
        assert audit_rows(tmp_path)[body["request_id"]][1] == body["verdict"]
    assert "8-bit" in _message(client.post("/v1/predict", files={"file": ("a.png", DARK)}), 422)


def test_a_raw_body_skips_the_forms_field_handling(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A raw body is matched by a route of its own (api/routes/v1.RawImageRoute), so FastAPI never
    handles the form's eleven fields for it; a form still reaches the multipart route, and the API's
    description keeps one /v1/predict operation that documents both."""
    import fastapi.dependencies.utils as fastapi_utils

    handled = []
    original = fastapi_utils.request_body_to_args

    async def counted(*args: object, **kwargs: object) -> object:
        handled.append(1)
        return await original(*args, **kwargs)

    monkeypatch.setattr(fastapi_utils, "request_body_to_args", counted)
    assert _raw(client, DARK, "modality=photo").status_code == 200
    assert handled == []
    assert predict(client, DARK).status_code == 200
    assert handled
    operations = client.app.openapi()["paths"]["/v1/predict"]
    assert list(operations) == ["post"]
    assert {"multipart/form-data", "image/*"} <= set(operations["post"]["requestBody"]["content"])
