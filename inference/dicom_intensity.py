"""DICOM/DICOS grey values to [0, 1] the way the file says to display them.

The modality LUT (rescale slope/intercept or a lookup table) first, then the VOI transform: the
window centre/width (top level or in the shared functional groups of an enhanced object), a VOI LUT,
or, with neither, the full range the stored bits can take. MONOCHROME1 is inverted so that, as in every
other X-ray we read, bright means little attenuation. inference/decode.py reads the file and calls this.
"""

from __future__ import annotations

import numpy as np

from verity.inference.colour import band_rows


def _dicom_window(dataset) -> tuple[float, float, str] | None:  # noqa: ANN001 - pydicom Dataset
    """(center, width, function) from the VOI LUT module, top level or shared functional groups."""
    holders = [dataset]
    shared = dataset.get("SharedFunctionalGroupsSequence")
    if shared:
        holders += list(shared[0].get("FrameVOILUTSequence") or [])
    for holder in holders:
        if "WindowCenter" in holder and "WindowWidth" in holder:
            center, width = holder.WindowCenter, holder.WindowWidth
            center = float(center[0] if holder["WindowCenter"].VM > 1 else center)
            width = float(width[0] if holder["WindowWidth"].VM > 1 else width)
            function = str(holder.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
            return center, width, function
    return None


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing, straight to [0, 1] instead of the stored bit range."""
    x = values.astype(np.float32)
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (x - center) / max(width, 1e-6)))).astype(np.float32)
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / max(width, 1e-6) + 0.5, 0.0, 1.0)
    if width <= 1.0:  # LINEAR with width 1 is a threshold at the center
        return (x > center - 0.5).astype(np.float32)
    return np.clip((x - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _modality_range(dataset) -> tuple[float, float]:  # noqa: ANN001 - pydicom Dataset
    """The range stored values can take after the modality LUT: a fixed scale, not the image's min/max."""
    modality_lut = dataset.get("ModalityLUTSequence")
    if modality_lut:
        return 0.0, float(2 ** int(modality_lut[0].LUTDescriptor[2]) - 1)
    bits = int(dataset.get("BitsStored", dataset.get("BitsAllocated", 16)))
    if int(dataset.get("PixelRepresentation", 0)) == 0:
        low, high = 0.0, float(2**bits - 1)
    else:
        low, high = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope = float(dataset.get("RescaleSlope", 1.0) or 1.0)
    intercept = float(dataset.get("RescaleIntercept", 0.0) or 0.0)
    ends = sorted((low * slope + intercept, high * slope + intercept))
    return ends[0], ends[1]


def dicom_grey_to_unit(pixels: np.ndarray, dataset) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    """The stored grey values of a DICOM object (frames first, if several) as float32 in [0, 1].

    Band by band of rows: the transforms are per pixel, and a band's float64 and float32 working copies
    are a few MB, where those of a whole 40 MP scan took 380 MB."""
    rows = pixels.reshape(-1, pixels.shape[-1])
    unit = np.empty(rows.shape, np.float32)
    step = band_rows(rows.shape[1])
    for top in range(0, rows.shape[0], step):
        unit[top : top + step] = _band_to_unit(rows[top : top + step], dataset)
    return unit.reshape(pixels.shape)


def _band_to_unit(pixels: np.ndarray, dataset) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
    from pydicom.pixels import apply_modality_lut, apply_voi

    values = apply_modality_lut(pixels, dataset)  # rescale slope/intercept or the modality LUT
    window = _dicom_window(dataset)
    if window is not None:
        unit = _apply_window(values, *window)
    elif dataset.get("VOILUTSequence"):
        lut = dataset.VOILUTSequence[0]
        unit = apply_voi(values, dataset).astype(np.float32) / float(2 ** int(lut.LUTDescriptor[2]) - 1)
    else:
        low, high = _modality_range(dataset)
        unit = (values.astype(np.float32) - low) / max(high - low, 1e-6)
    unit = np.clip(unit, 0.0, 1.0).astype(np.float32)
    if str(dataset.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        unit = 1.0 - unit  # MONOCHROME1 shows high values dark; we want transmission bright
    return unit
