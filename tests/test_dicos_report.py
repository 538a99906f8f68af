"""DICOS Threat Detection Reports out (issue 26): `format=dicos` or `Accept: application/dicom` on
/v1/predict, and `verity predict --format dicos`.

No DICOS-aware validator installs here (dicom3tools' dciodvfy knows no DICOS IOD: "Information Object
Not found"), so the TDR module's type-1 attributes are checked against pydicom's data dictionary: each
keyword known there, present, not empty, of the dictionary's VR and value count.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from api_fixtures import image_bytes, make_models_dir, make_settings
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.datadict import dictionary_VM, dictionary_VR, keyword_dict
from pydicom.uid import DICOSDigitalXRayImageStorageForPresentation, DICOSThreatDetectionReportStorage

from verity.api.app import create_app
from verity.api.audit import SQLiteAuditStore
from verity.datasets.encode import encode_dicom
from verity.datasets.synth import encode_png16
from verity.inference.dicos_report import ALARM_DECISIONS, Region, evidence_boxes
from verity.inference.vocabulary import VERDICTS

DICOM_BODY = {"Content-Type": "application/dicom"}
SCAN_UIDS = {
    "StudyInstanceUID": "1.2.826.0.1.3680043.8.498.101",
    "SeriesInstanceUID": "1.2.826.0.1.3680043.8.498.102",
}
# The TDR module's type-1 attributes (NEMA IIC 1: required whatever else is present), and those that a
# MACHINE report with an ALARM makes required, down to each potential threat object's.
TYPE_1 = ("TDRType", "AlarmDecision", "AlarmDecisionTime", "AbortFlag", "NumberOfTotalObjects",
          "TotalProcessingTime", "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
          "Modality")  # fmt: skip
TYPE_1_MACHINE = ("ThreatDetectionAlgorithmAndVersion",)
TYPE_1_ALARM = ("NumberOfAlarmObjects", "ThreatSequence")
TYPE_1_THREAT = ("PotentialThreatObjectID", "ATDAssessmentSequence", "PTORepresentationSequence")
TYPE_1_ASSESSMENT = ("ThreatCategory", "ATDAbilityAssessment", "ATDAssessmentFlag")
TYPE_1_REPRESENTATION = ("ReferencedInstanceSequence",)


def scan(level: int, **elements: object) -> bytes:
    """A 16-bit DICOS DX scan of one level (the tiny models: dark genuine, bright counterfeit)."""
    return encode_dicom(
        np.full((40, 48), level, np.uint16), **{**SCAN_UIDS, "PatientID": "PARCEL-7", **elements}
    )


def check_type_1(dataset, keywords: tuple[str, ...]) -> None:  # noqa: ANN001 - a pydicom Dataset
    for keyword in keywords:
        assert keyword in keyword_dict, f"{keyword} is not a keyword of pydicom's dictionary"
        element = dataset.data_element(keyword)
        assert element is not None and element.value not in (None, "", []), f"{keyword} missing or empty"
        tag = keyword_dict[keyword]
        assert dictionary_VR(tag) == element.VR, f"{keyword}: VR {element.VR}, not {dictionary_VR(tag)}"
        low, _, high = dictionary_VM(tag).partition("-")
        count = 1 if element.VR == "SQ" else element.VM
        assert count >= int(low) and (high in ("n", "") and (high or count == int(low)) or count <= int(high))


def check_report(report, verdict: str) -> None:  # noqa: ANN001
    check_type_1(report, TYPE_1 + TYPE_1_MACHINE)
    assert report.SOPClassUID == DICOSThreatDetectionReportStorage and report.Modality == "TDR"
    assert report.TDRType == "MACHINE" and report.AbortFlag == "SUCCESS"
    assert report.AlarmDecision == ALARM_DECISIONS[verdict]
    if report.AlarmDecision != "ALARM":
        assert report.NumberOfTotalObjects == 0 and "ThreatSequence" not in report
        return
    check_type_1(report, TYPE_1_ALARM)
    assert report.NumberOfAlarmObjects == report.NumberOfTotalObjects == len(report.ThreatSequence) >= 1
    for threat in report.ThreatSequence:
        check_type_1(threat, TYPE_1_THREAT)
        check_type_1(threat.ATDAssessmentSequence[0], TYPE_1_ASSESSMENT)
        check_type_1(threat.PTORepresentationSequence[0], TYPE_1_REPRESENTATION)


def test_every_verdict_has_an_alarm_decision() -> None:
    assert set(ALARM_DECISIONS) == set(VERDICTS)
    assert set(ALARM_DECISIONS.values()) == {"ALARM", "CLEAR", "UNKNOWN"}  # the standard's defined terms


@pytest.fixture()
def tiny(tmp_path: Path):  # noqa: ANN201
    make_models_dir(tmp_path)
    settings = make_settings(tmp_path, rate_limit_per_s=0, uid_root="1.2.826.0.1.3680043.10.1234.")
    with TestClient(create_app(settings)) as client:
        yield client, settings


@pytest.mark.parametrize("level", [0, 36000, 65535], ids=["genuine", "uncertain", "counterfeit"])
def test_a_dicos_scan_is_answered_with_a_report_that_names_it(tiny, level: int) -> None:
    client, settings = tiny
    data = scan(level)
    given = dcmread(io.BytesIO(data))
    verdict = client.post("/v1/predict", content=data, headers={"Content-Type": "application/dicom"}).json()
    answer = client.post(
        "/v1/predict?format=dicos", content=data, headers={"Content-Type": "application/dicom"}
    )
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/dicom"
    report = dcmread(io.BytesIO(answer.content))
    check_report(report, verdict["verdict"])
    assert answer.headers["x-verity-verdict"] == verdict["verdict"]
    if "ThreatSequence" in report:  # the calibrated score, as the JSON answer gives it (FL: float32)
        probability = report.ThreatSequence[0].ATDAssessmentSequence[0].ATDAssessmentProbability
        assert probability == pytest.approx(verdict["score"], abs=1e-6)
    # It names the scan by the scan's own identity, in the scan's study, in a series of its own.
    assert (report.StudyInstanceUID, report.PatientID) == (SCAN_UIDS["StudyInstanceUID"], "PARCEL-7")
    assert report.SeriesInstanceUID != SCAN_UIDS["SeriesInstanceUID"]
    assert report.SOPInstanceUID.startswith(settings.uid_root)
    for threat in report.get("ThreatSequence", []):
        (referenced,) = threat.PTORepresentationSequence[0].ReferencedInstanceSequence
        assert referenced.ReferencedSOPInstanceUID == given.SOPInstanceUID
        assert referenced.ReferencedSOPClassUID == given.SOPClassUID
    # The audit row holds the report's UID; the answer without a report has none.
    store = SQLiteAuditStore(settings.audit_db)
    try:
        assert store.get(answer.headers["x-request-id"]).report_uid == report.SOPInstanceUID
        assert store.get(verdict["request_id"]).report_uid is None
    finally:
        store.close()
    item = client.get(f"/v1/history/{answer.headers['x-request-id']}").json()
    assert item["report_uid"] == report.SOPInstanceUID and item["verdict"] == verdict["verdict"]


def test_levels_give_each_decision(tiny) -> None:
    """The three levels above are what the test says they are (the tiny model's thresholds)."""
    client, _ = tiny
    verdicts = [client.post("/v1/predict", content=scan(level), headers={"Content-Type": "application/dicom"})
                .json()["verdict"] for level in (0, 36000, 65535)]  # fmt: skip
    assert verdicts == ["genuine", "uncertain", "counterfeit"]


def test_an_accept_header_asks_for_the_report_and_a_png_scan_gets_fresh_uids(tiny) -> None:
    client, settings = tiny
    png = encode_png16(np.full((40, 48), 65535, np.uint16))
    answer = client.post("/v1/predict", files={"file": ("scan.png", png)}, data={"modality": "xray"},
                         headers={"Accept": "application/dicom, application/json;q=0.5"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    report = dcmread(io.BytesIO(answer.content))
    check_report(report, "counterfeit")
    referenced = report.ThreatSequence[0].PTORepresentationSequence[0].ReferencedInstanceSequence[0]
    assert referenced.ReferencedSOPClassUID == DICOSDigitalXRayImageStorageForPresentation
    for uid in (report.StudyInstanceUID, referenced.ReferencedSOPInstanceUID, report.SOPInstanceUID):
        assert uid.startswith(settings.uid_root)
    # A flat scan has no place that stands out: the whole scan is the object, in its own pixels.
    polygon = report.ThreatSequence[0].PTORepresentationSequence[0].BoundingPolygon
    assert list(polygon) == Region(0, 0, 48, 40).polygon()
    # JSON ranked first, or no Accept at all: JSON.
    for accept in ("application/json, application/dicom;q=0.9", "*/*"):
        plain = client.post("/v1/predict", files={"file": ("scan.png", png)}, data={"modality": "xray"},
                            headers={"Accept": accept})  # fmt: skip
        assert plain.headers["content-type"].startswith("application/json")


def test_a_report_for_a_photo_or_an_unknown_format_is_refused(tiny) -> None:
    client, _ = tiny
    photo = client.post("/v1/predict", files={"file": ("a.png", image_bytes(250))},
                        data={"modality": "photo", "format": "dicos"})  # fmt: skip
    assert photo.status_code == 406 and photo.json()["error"]["code"] == "not_acceptable"
    assert "X-ray" in photo.json()["error"]["message"]
    unknown = client.post(
        "/v1/predict?format=pdf", content=scan(0), headers={"Content-Type": "application/dicom"}
    )
    assert unknown.status_code == 422 and "format" in unknown.json()["error"]["message"]


def test_an_image_the_xray_model_does_not_recognise_is_unknown(tmp_path: Path) -> None:
    """The shipped X-ray model's gate: noise sent as an X-ray is not recognised, so UNKNOWN."""
    settings = make_settings(tmp_path, models_dir=Path(__file__).resolve().parents[1] / "checkpoints")
    noise = np.random.default_rng(0).integers(0, 65535, (200, 200), dtype=np.uint16)
    with TestClient(create_app(settings)) as client:
        verdict = client.post("/v1/predict?modality=xray", content=encode_png16(noise),
                              headers={"Content-Type": "image/png"}).json()  # fmt: skip
        answer = client.post("/v1/predict?modality=xray&format=dicos", content=encode_png16(noise),
                             headers={"Content-Type": "image/png"})  # fmt: skip
    assert "not_recognised" in verdict["reasons"] and verdict["verdict"] == "uncertain"
    check_report(dcmread(io.BytesIO(answer.content)), "uncertain")


def test_regions_are_the_strongest_connected_evidence_in_order() -> None:
    evidence = np.full((100, 80), -1.0, np.float32)
    evidence[10:30, 5:25] = 3.0  # the peak: 400 pixels of 3
    evidence[60:90, 50:70] = 2.5  # weaker, but more evidence in all: 600 pixels of 2.5
    evidence[45:47, 2:4] = 1.0  # below half the peak: not a region
    boxes = evidence_boxes(evidence)
    # Found on the map pooled to at most 64 cells a side (2 pixels here): edges within one cell.
    assert np.allclose(boxes, [(50, 60, 70, 90), (5, 10, 25, 30)], atol=2)
    assert evidence_boxes(np.full((10, 10), -2.0, np.float32)) == []  # nothing towards counterfeit


def test_the_cli_writes_the_report_the_server_answers(tiny, tmp_path: Path, capsys) -> None:
    from verity.inference.cli import main as predict_main

    client, settings = tiny
    data = scan(65535)
    path = tmp_path / "parcel.dcm"
    path.write_bytes(data)
    answer = client.post("/v1/predict?format=dicos", content=data, headers=DICOM_BODY)
    served = dcmread(io.BytesIO(answer.content))
    model = settings.models_dir / "xray-test" / "1"
    assert (
        predict_main(
            [str(path), "--model", str(model), "--format", "dicos", "--reports", str(tmp_path / "r")]
        )
        == 0
    )
    written = dcmread(tmp_path / "r" / "parcel.tdr.dcm")
    assert "parcel.tdr.dcm" in capsys.readouterr().out
    for keyword in ("AlarmDecision", "StudyInstanceUID", "PatientID", "NumberOfAlarmObjects"):
        assert written.data_element(keyword).value == served.data_element(keyword).value
    got, want = (
        np.array(r.ThreatSequence[0].PTORepresentationSequence[0].BoundingPolygon) for r in (written, served)
    )
    assert np.allclose(got, want, atol=1e-4)
    with pytest.raises(SystemExit):  # a photo model writes no threat reports
        predict_main(
            [str(path), "--model", str(settings.models_dir / "photo-test" / "2"), "--format", "dicos"]
        )
    with pytest.raises(SystemExit):
        predict_main([str(path), "--model", str(model), "--format", "dicos", "--uid-root", "1.02.x"])


def test_a_pair_in_a_two_sample_tiff_gets_its_report(tiny) -> None:
    """A file Pillow cannot open (a two-sample TIFF, a dual-energy pair): the report still names its size."""
    import tifffile

    client, _ = tiny
    pair = np.stack([np.full((40, 48), 65535, np.uint16), np.full((40, 48), 30000, np.uint16)], axis=2)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, pair, photometric="minisblack", planarconfig="contig")
    answer = client.post("/v1/predict?format=dicos&modality=xray", content=buffer.getvalue(),
                         headers={"Content-Type": "image/tiff"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    report = dcmread(io.BytesIO(answer.content))
    check_report(report, answer.headers["x-verity-verdict"])
    polygon = report.ThreatSequence[0].PTORepresentationSequence[0].BoundingPolygon
    assert list(polygon) == Region(0, 0, 48, 40).polygon()
