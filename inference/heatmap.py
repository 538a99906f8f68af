"""Evidence heatmaps: the model's class activation map, normalised, upsampled, coloured, overlaid.

The CAM is a second output of the same forward pass (see the ONNX contract), so an explanation costs
no extra inference. `Prediction.cam` is "counterfeit minus genuine" on the model's feature grid, in
logit units. Normalisation follows Grad-CAM: only positive evidence for counterfeit is shown (ReLU),
scaled by its maximum, so a region is hot because it pushed the score towards counterfeit; a map with
no positive evidence stays cold instead of having noise stretched to full range.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# A perceptually ordered "turbo"-like ramp (dark blue -> cyan -> green -> yellow -> red); anchors are
# interpolated into a 256-entry lookup table, so no plotting library is needed.
_ANCHORS = np.array(
    [
        (0.00, (48, 18, 59)),
        (0.15, (70, 107, 227)),
        (0.35, (27, 208, 213)),
        (0.50, (97, 252, 108)),
        (0.65, (210, 233, 53)),
        (0.80, (254, 155, 45)),
        (1.00, (180, 4, 4)),
    ],
    dtype=object,
)
_POSITIONS = np.array([a[0] for a in _ANCHORS], dtype=np.float64)
_COLOURS = np.array([a[1] for a in _ANCHORS], dtype=np.float64)
LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), _POSITIONS, _COLOURS[:, channel]) for channel in range(3)], axis=1
).round().astype(np.uint8)


def normalise_cam(cam: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Positive evidence in [0, 1]: ReLU, divided by `scale` (default: the map's own maximum)."""
    positive = np.maximum(np.asarray(cam, dtype=np.float32), 0.0)
    top = float(positive.max()) if scale is None else float(scale)
    if top <= 0.0:
        return np.zeros_like(positive)
    return np.clip(positive / top, 0.0, 1.0)


def upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a 2-D float map to height x width."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)


def colour_map(values: np.ndarray) -> np.ndarray:
    """HxW values in [0, 1] -> HxWx3 uint8 colours."""
    index = np.clip(np.asarray(values) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return LUT[index]


def to_display_rgb(image: np.ndarray) -> np.ndarray:
    """An image to show under the heatmap as HxWx3 uint8.

    Accepts a model input (CxSxS float in [0, 1]) or a decoded image (HxW or HxWxC, uint8, uint16 or
    float in [0, 1]). Grey and dual-energy images show their first channel in grey.
    """
    array = to_display_uint8(image)
    if array.shape[2] != 3:
        array = np.repeat(array, 3, axis=2)
    return np.ascontiguousarray(array)


def to_display_uint8(image: np.ndarray) -> np.ndarray:
    """`to_display_rgb` before grey is spread to 3 channels: HxWx3, or HxWx1 for grey and dual-energy
    (a large scan is shrunk in this form, a third of the pixels)."""
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[0] in (1, 2, 3) and array.shape[2] not in (1, 2, 3):
        array = array.transpose(1, 2, 0)  # CxHxW model input
    if array.ndim == 2:
        array = array[..., None]
    if array.shape[2] != 3:
        array = array[..., :1]  # select the plane before converting: 3x less work for grey scans
    if array.dtype == np.uint16:
        array = (array >> 8).astype(np.uint8)
    elif array.dtype != np.uint8:
        array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return array


def overlay(image_rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blends the coloured heat over the image; the blend weight grows with the heat, so cold regions
    keep the image as it is and hot ones are clearly marked."""
    if heat.shape != image_rgb.shape[:2]:
        heat = upsample(heat, image_rgb.shape[0], image_rgb.shape[1])
    weight = (alpha * np.clip(heat, 0.0, 1.0))[..., None]
    blended = image_rgb.astype(np.float32) * (1.0 - weight) + colour_map(heat).astype(np.float32) * weight
    return (blended + 0.5).astype(np.uint8)


def png_bytes(rgb: np.ndarray) -> bytes:
    """PNG-encodes an HxWx3 uint8 array (fast compression: these are per-request answers)."""
    buffer = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def heatmap_png(
    cam: np.ndarray,
    image: np.ndarray,
    alpha: float = 0.5,
    max_side: int | None = 1024,
    scale: float | None = None,
) -> bytes:
    """PNG bytes of the CAM overlaid on `image` (a model input or a decoded image).

    The output has the image's size, reduced to at most `max_side` pixels on its longer side (a 4000 px
    scan overlay need not be sent at full size). `scale` fixes the normalisation (see `normalise_cam`).
    """
    rgb = to_display_rgb(image)
    if max_side is not None and max(rgb.shape[:2]) > max_side:
        factor = max_side / max(rgb.shape[:2])
        size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
        rgb = np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))
    heat = upsample(normalise_cam(cam, scale), rgb.shape[0], rgb.shape[1])
    return png_bytes(overlay(rgb, heat, alpha))
