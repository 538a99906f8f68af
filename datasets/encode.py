"""Encoders for the file forms X-ray consoles write, beyond what Pillow saves: DICOS/DICOM DX.

Used by tests and benchmarks to re-encode an image the way a scanner would send it.
"""

from __future__ import annotations

import io

import numpy as np

# DICOS Digital X-Ray Image Storage, for presentation (PS3.3 of NEMA IIC 1 DICOS).
DICOS_DX = "1.2.840.10008.5.1.4.1.1.501.2.1"


def encode_dicom(
    pixels: np.ndarray, sop_class: str = DICOS_DX, transfer_syntax: str | None = None, **elements: object
) -> bytes:
    """A Part-10 file of 16-bit MONOCHROME2 pixels (HxW, or FxHxW for frames such as a dual-energy pair).

    The default SOP class is DICOS Digital X-Ray; `elements` set or override data elements by keyword
    (RescaleSlope, WindowCenter, PhotometricInterpretation, ...).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = FileDataset("scan.dcm", {}, file_meta=meta, preamble=b"\x00" * 128)
    dataset.SOPClassUID = sop_class
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Modality = "DX"
    frames = pixels.shape[0] if pixels.ndim == 3 else 1
    dataset.Rows, dataset.Columns = pixels.shape[-2:]
    if frames > 1:
        dataset.NumberOfFrames = frames
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = 16
    dataset.BitsStored = 16
    dataset.HighBit = 15
    dataset.PixelRepresentation = 0
    for name, value in elements.items():
        setattr(dataset, name, value)
    dataset.PixelData = pixels.astype("<u2").tobytes()
    if transfer_syntax:
        dataset.compress(transfer_syntax, pixels.astype(np.uint16))
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
