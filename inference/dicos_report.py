"""DICOS Threat Detection Reports (NEMA IIC 1): a verdict on an X-ray scan as the object that a scanner's
operator workstation draws over the scan, instead of our JSON.

A report (SOP Class DICOS Threat Detection Report Storage) holds no pixels: it names the scan it answers
(the input's own Study, Series and SOP Instance UIDs when the input was DICOM/DICOS; fresh UIDs under
the configured root otherwise), the machine's decision and one potential threat object (PTO) per region
that alarmed, each with a bounding polygon in the scan's pixel coordinates and the calibrated score as
its assessment probability. Every attribute is set by its keyword in pydicom's data dictionary; the
defined terms are the standard's (ALARM, CLEAR, UNKNOWN; MACHINE; SUCCESS; THREAT; NO_INTERFERENCE;
CONTRABAND).

Verdicts map to the alarm decision as ALARM_DECISIONS says: `uncertain` (an image not recognised
included) is UNKNOWN, which a workstation hands to the operator; a genuine verdict is CLEAR, the
standard's defined term (some consoles say NO_ALARM, which DICOS toolkits read as UNKNOWN).

The regions come from the evidence map the heatmap shows (a tiled scan's assembled map, or the whole
image's class activation map mapped back through the preprocessing's resize): positive evidence at
REGION_LEVEL of its maximum or above, in connected parts, the MAX_OBJECTS with the most evidence kept.
An alarm with no positive evidence anywhere reports the whole scan.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import numpy as np

from verity.inference.pipeline import Scored
from verity.inference.spec import PreprocessSpec
from verity.inference.tiling import content_box

if TYPE_CHECKING:
    from pydicom.dataset import Dataset, FileDataset

# Each verdict (vocabulary.VERDICTS) as the standard's Alarm Decision. An image not recognised is
# `uncertain` (with `not_recognised` among its reasons), so UNKNOWN too: the operator decides.
ALARM_DECISIONS = {"counterfeit": "ALARM", "genuine": "CLEAR", "uncertain": "UNKNOWN"}
THREAT_CATEGORY = "CONTRABAND"  # DICOS defined term: goods that may not cross; counterfeits are
THREAT_DESCRIPTION = "suspected counterfeit goods"
MANUFACTURER = "Verity"
# pydicom's own root (generate_uid's default): UIDs that a deployment has no root of its own for.
DEFAULT_UID_ROOT = "1.2.826.0.1.3680043.8.498."
# An organisation's root: an ISO OID ending in "." (no leading zeros), short enough that a UID made
# under it stays within DICOM's 64 characters.
UID_ROOT_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*\.$"
UID_ROOT_MAX = 40
REGION_LEVEL = 0.5  # a region is evidence at half the strongest positive evidence or more
MAX_OBJECTS = 3
GRID_MAX = 64  # the evidence map is pooled to at most this many cells a side before regions are found
OOI_TYPE = "BAGGAGE"  # DICOS's type for a screened container of goods, when the input does not say


@dataclass(frozen=True)
class ScanReference:
    """The scan a report answers: the input's own DICOM identity, or fresh UIDs (`from_input` False)."""

    study_uid: str
    series_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    ooi_id: str  # the object of inspection (the parcel): the input's Patient ID, or the case or request id
    ooi_type: str
    study_date: str
    study_time: str
    study_id: str
    rows: int
    columns: int
    from_input: bool


@dataclass(frozen=True)
class Region:
    """A box in the scan's pixel coordinates (columns x, rows y; the top-left pixel's corner is 0, 0)."""

    left: float
    top: float
    right: float
    bottom: float

    def polygon(self) -> list[float]:
        """DICOS Bounding Polygon: vertices as x, y, z (z = 0 on a 2D image), clockwise from top-left."""
        corners = (
            (self.left, self.top),
            (self.right, self.top),
            (self.right, self.bottom),
            (self.left, self.bottom),
        )
        return [float(value) for x, y in corners for value in (x, y, 0.0)]


def scan_reference(
    header: Dataset | None, shape: tuple[int, int], uid_root: str, ooi_id: str
) -> ScanReference:
    """The scan's identity: a DICOM input's own elements (its header); fresh UIDs for any other file."""
    from pydicom.uid import DICOSDigitalXRayImageStorageForPresentation, generate_uid

    now = datetime.now(UTC)
    dx = str(DICOSDigitalXRayImageStorageForPresentation)
    fresh = ScanReference(
        study_uid=generate_uid(uid_root), series_uid=generate_uid(uid_root), sop_class_uid=dx,
        sop_instance_uid=generate_uid(uid_root), ooi_id=ooi_id, ooi_type=OOI_TYPE,
        study_date=now.strftime("%Y%m%d"), study_time=now.strftime("%H%M%S"), study_id="",
        rows=shape[0], columns=shape[1], from_input=False,
    )  # fmt: skip
    if header is None:
        return fresh
    if not (header.get("StudyInstanceUID") and header.get("SOPInstanceUID") and header.get("SOPClassUID")):
        return fresh  # a scan without its identity: the report cannot point back to it, so it names a new one

    def text(keyword: str, default: str) -> str:
        value = header.get(keyword)
        return str(value) if value not in (None, "") else default

    return ScanReference(
        study_uid=str(header.StudyInstanceUID), series_uid=text("SeriesInstanceUID", fresh.series_uid),
        sop_class_uid=str(header.SOPClassUID), sop_instance_uid=str(header.SOPInstanceUID),
        ooi_id=text("PatientID", ooi_id), ooi_type=text("OOIType", OOI_TYPE),
        study_date=text("StudyDate", fresh.study_date), study_time=text("StudyTime", fresh.study_time),
        study_id=text("StudyID", ""), rows=int(header.get("Rows", shape[0])),
        columns=int(header.get("Columns", shape[1])), from_input=True,
    )  # fmt: skip


def _pooled(evidence: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Positive evidence max-pooled to at most GRID_MAX cells a side, and each cell's size in map pixels."""
    positive = np.maximum(np.nan_to_num(evidence.astype(np.float32)), 0.0)
    height, width = positive.shape
    step = max(1, int(np.ceil(max(height, width) / GRID_MAX)))
    rows, columns = -(-height // step), -(-width // step)
    padded = np.zeros((rows * step, columns * step), np.float32)
    padded[:height, :width] = positive
    return padded.reshape(rows, step, columns, step).max(axis=(1, 3)), float(step), float(step)


def _components(hot: np.ndarray) -> list[list[tuple[int, int]]]:
    """The 8-connected parts of a small boolean grid (at most GRID_MAX a side)."""
    seen = np.zeros_like(hot)
    parts = []
    for start in zip(*np.nonzero(hot), strict=True):
        if seen[start]:
            continue
        seen[start] = True
        stack, part = [start], []
        while stack:
            y, x = stack.pop()
            part.append((int(y), int(x)))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = y + dy, x + dx
                    if 0 <= ny < hot.shape[0] and 0 <= nx < hot.shape[1] and hot[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        stack.append((ny, nx))
        parts.append(part)
    return parts


def evidence_boxes(evidence: np.ndarray) -> list[tuple[float, float, float, float]]:
    """Boxes (left, top, right, bottom) in the evidence map's pixels around its strongest positive parts,
    strongest first; empty when nothing points towards counterfeit."""
    grid, cell_h, cell_w = _pooled(evidence)
    peak = float(grid.max()) if grid.size else 0.0
    if peak <= 0.0:
        return []
    parts = _components(grid >= REGION_LEVEL * peak)
    parts.sort(key=lambda part: -sum(float(grid[cell]) for cell in part))
    height, width = evidence.shape
    boxes = []
    for part in parts[:MAX_OBJECTS]:
        ys, xs = [cell[0] for cell in part], [cell[1] for cell in part]
        boxes.append((min(xs) * cell_w, min(ys) * cell_h, min(width, (max(xs) + 1) * cell_w),
                      min(height, (max(ys) + 1) * cell_h)))  # fmt: skip
    return boxes


def alarm_regions(scored: Scored, spec: PreprocessSpec, shape: tuple[int, int]) -> list[Region]:
    """The regions that alarmed, in the scan's pixels (`shape`: its height, width): from a tiled scan's
    evidence map (at `evidence_scale` of the scan), or from the model's activation map over the model
    input, through the resize that made the input (stretch fills it; letterbox centres the image)."""
    height, width = shape
    if scored.scan is not None:
        scale = scored.scan.evidence_scale
        return [Region(left / scale, top / scale, right / scale, bottom / scale)
                for left, top, right, bottom in evidence_boxes(scored.scan.evidence)]  # fmt: skip
    size = spec.image_size
    over_model_input = scored.over_input(scored.output.cam, size)
    if over_model_input is None:
        return []
    # The activation map as the heatmap shows it (upsampled over the model input), cut to where the image
    # lies in that input (stretch fills it; letterbox centres it), then scaled to the scan's pixels.
    top, left, box_h, box_w = content_box(height, width, spec)
    over_image = over_model_input[top : top + box_h, left : left + box_w]
    sx, sy = width / box_w, height / box_h
    return [Region(x0 * sx, y0 * sy, x1 * sx, y1 * sy) for x0, y0, x1, y1 in evidence_boxes(over_image)]


@dataclass(frozen=True)
class ReportFacts:
    """What the report states besides the scan and the regions: the answer, its model and its timing."""

    report_uid: str  # the report's SOP Instance UID, recorded in the audit row before the answer leaves
    verdict: str
    score: float  # calibrated probability of counterfeit
    model: str
    version: str
    alarm: float
    clear: float
    decided: datetime  # when the verdict was recorded (UTC)
    processing_ms: float
    uid_root: str = DEFAULT_UID_ROOT


def _dt(moment: datetime) -> str:
    """DICOM DT with the UTC offset: YYYYMMDDHHMMSS.FFFFFF+0000."""
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S.%f+0000")


def _sequence_item(**elements: object):  # noqa: ANN202 - a pydicom Dataset
    from pydicom.dataset import Dataset

    item = Dataset()
    for keyword, value in elements.items():
        setattr(item, keyword, value)
    return item


def _threat(number: int, region: Region, scan: ScanReference, facts: ReportFacts):  # noqa: ANN202
    """One potential threat object: its assessment, and where it lies on the referenced scan."""
    assessment = _sequence_item(
        ThreatCategory=THREAT_CATEGORY, ThreatCategoryDescription=THREAT_DESCRIPTION,
        ATDAbilityAssessment="NO_INTERFERENCE", ATDAssessmentFlag="THREAT",
        ATDAssessmentProbability=float(facts.score),
    )  # fmt: skip
    referenced = _sequence_item(ReferencedSOPClassUID=scan.sop_class_uid,
                                ReferencedSOPInstanceUID=scan.sop_instance_uid)  # fmt: skip
    roi = _sequence_item(
        ThreatROIBase=[float(region.left), float(region.top), 0.0],
        ThreatROIExtents=[float(region.right - region.left), float(region.bottom - region.top), 1.0],
    )  # fmt: skip
    representation = _sequence_item(ReferencedInstanceSequence=[referenced], BoundingPolygon=region.polygon(),
                                    ThreatROIVoxelSequence=[roi])  # fmt: skip
    return _sequence_item(PotentialThreatObjectID=number, ATDAssessmentSequence=[assessment],
                          PTORepresentationSequence=[representation])  # fmt: skip


def threat_report(scan: ScanReference, regions: list[Region], facts: ReportFacts) -> bytes:
    """The report as a DICOM Part-10 file (explicit VR little endian)."""
    decision = ALARM_DECISIONS[facts.verdict]
    if decision == "ALARM" and not regions:  # no positive evidence anywhere: the whole scan alarmed
        regions = [Region(0.0, 0.0, float(scan.columns), float(scan.rows))]
    threats = regions[:MAX_OBJECTS] if decision == "ALARM" else []
    report = _part10_dataset(facts.report_uid)
    for keyword, value in _report_elements(scan, facts, decision, len(threats)).items():
        setattr(report, keyword, value)
    if threats:
        report.ThreatSequence = [
            _threat(number, region, scan, facts) for number, region in enumerate(threats, 1)
        ]
    buffer = io.BytesIO()
    report.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _part10_dataset(report_uid: str) -> FileDataset:
    """An empty TDR dataset with the file meta information a Part-10 file carries."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, DICOSThreatDetectionReportStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DICOSThreatDetectionReportStorage
    meta.MediaStorageSOPInstanceUID = UID(report_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return FileDataset("report.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)


def _report_elements(
    scan: ScanReference, facts: ReportFacts, decision: str, objects: int
) -> dict[str, object]:
    """The report's top-level elements by keyword, module by module."""
    from pydicom.uid import DICOSThreatDetectionReportStorage, generate_uid

    created = facts.decided.astimezone(UTC)
    return {
        # SOP Common
        "SpecificCharacterSet": "ISO_IR 192",
        "SOPClassUID": DICOSThreatDetectionReportStorage,
        "SOPInstanceUID": facts.report_uid,
        "InstanceCreationDate": created.strftime("%Y%m%d"),
        "InstanceCreationTime": created.strftime("%H%M%S.%f"),
        "InstanceNumber": 1,
        "ContentDate": created.strftime("%Y%m%d"),
        "ContentTime": created.strftime("%H%M%S.%f"),
        # Object of Inspection (DICOS's use of the Patient module) and the scan's study
        "PatientName": "",
        "PatientID": scan.ooi_id,
        "OOIType": scan.ooi_type,
        "StudyInstanceUID": scan.study_uid,
        "StudyDate": scan.study_date,
        "StudyTime": scan.study_time,
        "StudyID": scan.study_id,
        # The report's own series, beside the scan's in the same study
        "Modality": "TDR",
        "SeriesInstanceUID": generate_uid(facts.uid_root),
        "SeriesNumber": 1,
        "SeriesDate": created.strftime("%Y%m%d"),
        "SeriesTime": created.strftime("%H%M%S.%f"),
        "Manufacturer": MANUFACTURER,
        "SoftwareVersions": [f"{facts.model} {facts.version}"],
        # Threat Detection Report
        "TDRType": "MACHINE",
        "ThreatDetectionAlgorithmAndVersion": [MANUFACTURER, f"{facts.model} {facts.version}",
                                               f"alarm={facts.alarm:.4f}", f"clear={facts.clear:.4f}"],
        "AlarmDecision": decision,
        "AlarmDecisionTime": _dt(facts.decided),
        "AbortFlag": "SUCCESS",
        "NumberOfTotalObjects": objects,
        "NumberOfAlarmObjects": objects,
        "TotalProcessingTime": max(float(facts.processing_ms), 0.001),
    }  # fmt: skip


def dicom_header(data: bytes) -> Dataset:
    """A DICOM file's elements without its pixels."""
    from pydicom import dcmread

    return dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)


def image_shape(data: bytes, header: Dataset | None) -> tuple[int, int]:
    """The scan's height and width from its header (no pixels decoded)."""
    if header is not None:
        return int(header.Rows), int(header.Columns)
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.height, image.width
    except Exception:  # noqa: BLE001 - a file Pillow cannot open (a two-sample TIFF): the decoder can
        from verity.inference.decode import decode_image

        height, width = decode_image(data).shape[:2]
        return int(height), int(width)


def report_for(data: bytes, scored: Scored, spec: PreprocessSpec, facts: ReportFacts, ooi_id: str) -> bytes:
    """The whole report for one scored upload (its bytes name the scan when it was DICOM)."""
    header = dicom_header(data) if scored.upload.kind == "dicom" else None
    shape = scored.scan.image_shape if scored.scan is not None else image_shape(data, header)
    scan = scan_reference(header, shape, facts.uid_root, ooi_id)
    alarmed = ALARM_DECISIONS[facts.verdict] == "ALARM"
    return threat_report(scan, alarm_regions(scored, spec, shape) if alarmed else [], facts)


def new_report_uid(uid_root: str = DEFAULT_UID_ROOT) -> str:
    """A fresh SOP Instance UID under the root, for a report that is about to be recorded."""
    from pydicom.uid import generate_uid

    return str(generate_uid(uid_root))
