"""A dual-energy pair through /v1/predict in the three forms consoles send it: a two-page TIFF, a
two-frame DICOS DX, and two files (`high`, `low`). The same parcel gets the same score in each (to 1e-4),
and the answer says which of its images the model scored."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from api_fixtures import make_settings
from fastapi.testclient import TestClient

from verity.api.app import create_app
from verity.datasets.encode import encode_dicom
from verity.datasets.synth import DIFFICULTIES, ImageJob, cue_policy, encode_png16, generator_for, plan_cases
from verity.datasets.synth_xray import scan_and_goods

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints"
pytestmark = pytest.mark.slow


def parcels(count: int) -> list[np.ndarray]:
    """Synthetic dual-energy scans, 2 x H x W uint16 (high, low), of both labels."""
    cases = plan_cases(21, count, cue_policy(generator_for("xray"), (), ()))
    return [scan_and_goods(ImageJob(i, 21, case, DIFFICULTIES["medium"], 192, dual_energy=True))[0]
            for i, case in enumerate(cases)]  # fmt: skip


def two_page_tiff(pair: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pair)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    settings = make_settings(tmp_path_factory.mktemp("dual"), models_dir=SHIPPED, rate_limit_per_s=0)
    with TestClient(create_app(settings)) as client:
        yield client


def three_forms(client: TestClient, pair: np.ndarray) -> list[dict]:
    """The pair's answers as a two-page TIFF, a two-frame DICOS and two files, checked to agree: each
    200, the same score to 1e-4 and the same verdict."""
    answers = [
        client.post("/v1/predict", files={"file": ("pair.tif", two_page_tiff(pair))}),
        client.post("/v1/predict", files={"file": ("pair.dcm", encode_dicom(pair))}),
        client.post("/v1/predict", files={"high": ("high.png", encode_png16(pair[0])),
                                          "low": ("low.png", encode_png16(pair[1]))}),  # fmt: skip
    ]
    bodies = [answer.json() for answer in answers]
    assert [answer.status_code for answer in answers] == [200, 200, 200], bodies
    scores = [body["score"] for body in bodies]
    assert max(scores) - min(scores) <= 1e-4, scores
    assert {body["verdict"] for body in bodies} == {bodies[0]["verdict"]}
    return bodies


def test_the_three_forms_of_a_pair_score_alike(client: TestClient) -> None:
    for pair in parcels(4):
        bodies = three_forms(client, pair)
        scores = [body["score"] for body in bodies]
        # The shipped model takes one plane: it scored the high-energy image, and says so.
        assert {body["dual_energy_used"] for body in bodies} == {"high"}
        assert {body["modality"] for body in bodies} == {"xray"}  # a pair is an X-ray without being told
    single = client.post("/v1/predict", files={"file": ("one.png", encode_png16(pair[0]))}).json()
    assert single["dual_energy_used"] is None
    assert abs(single["score"] - scores[0]) <= 1e-4  # the high-energy image alone: what the model scored


def test_a_pair_must_be_both_files_of_one_size(client: TestClient) -> None:
    pair = parcels(1)[0]
    high, low = encode_png16(pair[0]), encode_png16(pair[1])
    only_high = client.post("/v1/predict", files={"high": ("h.png", high)})
    assert only_high.status_code == 422 and "`high` and `low`" in only_high.json()["error"]["message"]
    with_file = client.post("/v1/predict", files={"high": ("h.png", high), "low": ("l.png", low),
                                                  "file": ("f.png", high)})  # fmt: skip
    assert with_file.status_code == 422
    smaller = encode_png16(pair[1][:-8])
    mismatch = client.post("/v1/predict", files={"high": ("h.png", high), "low": ("l.png", smaller)})
    assert mismatch.status_code == 400 and "differ in size" in mismatch.json()["error"]["message"]
    colour = client.post("/v1/predict", files={"high": ("h.png", high),
                                               "low": ("l.png", _rgb_png())})  # fmt: skip
    assert colour.status_code == 400 and "single grey channel" in colour.json()["error"]["message"]


def _rgb_png() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
