"""Evidence heatmaps: the model's class activation map, normalised, upsampled, coloured, overlaid.

The CAM is a second output of the same forward pass (see the ONNX contract), so an explanation costs
no extra inference. `Prediction.cam` is "counterfeit minus genuine" on the model's feature grid, in
logit units. Normalisation follows Grad-CAM: only positive evidence for counterfeit is shown (ReLU),
scaled by its maximum, so a region is hot because it pushed the score towards counterfeit; a map with
no positive evidence stays cold instead of having noise stretched to full range.

The view (`view_rgb`, `scan_view_rgb`) is the image the heatmap is drawn on, and what a client shows
under it: the model input (or a tiled scan, through the same colour rule and window, at the evidence
map's size) as 8-bit RGB. An X-ray view is display-windowed when its intensities fill less than
DISPLAY_MIN_SPREAD of the model's range: a 12-bit scan in a 16-bit file without a spec window reaches the
model as 0..0.06 and would be shown black; stretched linearly between its 0.5th and 99.5th percentiles
it shows what the model saw, with contrast a person can see (a scanner console's auto window).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from verity.inference.preprocess import to_unit_image
from verity.inference.spec import PreprocessSpec

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


# Where a backbone's feature map lies over its input. Every stride-2 convolution of efficientnet_lite0,
# mobilenet_v3 and resnet has an odd kernel padded alike on both sides, so each puts output i over input
# 2i, and cell j of the final map over input pixel stride * j: "corner". A patchify stem and patchify
# downsampling (convnext: kernels of the stride's size, no padding) centre cell j in its block of
# pixels, where an image resize puts it: "centre". Drawing a corner map as a resize had shifted every
# heatmap down and right by (stride - 1) / 2 pixels, half a cell (15.5 px of a 160 px input).
CORNER, CENTRE = "corner", "centre"
FEATURE_ALIGNMENTS = (CORNER, CENTRE)
PATCHIFY_BACKBONES = ("convnext",)


def feature_alignment(backbone: str | None) -> str:
    """CENTRE for a patchify backbone, else CORNER (every other backbone Verity trains)."""
    return CENTRE if backbone and backbone.startswith(PATCHIFY_BACKBONES) else CORNER


def over_input(grid: np.ndarray, size: int, alignment: str) -> np.ndarray:
    """A feature map (rows x columns of cells) as values over the size x size model input: bilinear
    between the cells' centres, placed as `alignment` says, and flat beyond the outermost ones."""
    values = np.asarray(grid, dtype=np.float32)
    rows = _interpolation(values.shape[0], size, alignment)
    columns = _interpolation(values.shape[1], size, alignment)
    return rows @ values @ columns.T


def _interpolation(cells: int, pixels: int, alignment: str) -> np.ndarray:
    """pixels x cells bilinear weights: pixel p reads the map at cell coordinate u (cell j's centre at
    u = j). The stride is the network's, a power of two (a 200 px input has 7 cells of 32 px)."""
    stride = 2.0 ** round(math.log2(pixels / cells)) if cells < pixels else pixels / cells
    position = np.arange(pixels, dtype=np.float64)
    u = position / stride if alignment == CORNER else (position + 0.5) / stride - 0.5
    u = np.clip(u, 0.0, cells - 1)
    low = np.floor(u).astype(np.int64)
    high = np.minimum(low + 1, cells - 1)
    weights = np.zeros((pixels, cells), dtype=np.float32)
    weights[np.arange(pixels), low] += (1.0 - (u - low)).astype(np.float32)
    weights[np.arange(pixels), high] += (u - low).astype(np.float32)
    return weights


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
    return heatmap_over(cam, rgb, alpha, scale)


def heatmap_over(cam: np.ndarray, rgb: np.ndarray, alpha: float = 0.5, scale: float | None = None) -> bytes:
    """PNG bytes of the CAM (or a scan's evidence map) overlaid on an HxWx3 uint8 view, at its size."""
    heat = upsample(normalise_cam(cam, scale), rgb.shape[0], rgb.shape[1])
    return png_bytes(overlay(rgb, heat, alpha))


# An X-ray view whose intensities (0.5th to 99.5th percentile) span less than this much of [0, 1] is
# stretched to fill it for display; one spanning more is shown exactly as the model saw it.
DISPLAY_MIN_SPREAD = 0.5
_WINDOW_SAMPLE = 1 << 18  # values the percentiles are read from: a 1024 px view has 4x as many


def display_window(planes: np.ndarray, ignore: float | None = None) -> np.ndarray:
    """CxHxW float [0, 1] stretched linearly (all channels alike, so hue stays) when it is too narrow
    to see (DISPLAY_MIN_SPREAD); `ignore` is a value left out of the percentiles (letterbox padding)."""
    values = planes.reshape(-1)
    values = values[:: max(1, values.size // _WINDOW_SAMPLE)]
    if ignore is not None:
        values = values[values != np.float32(ignore)]
    if values.size == 0:
        return planes
    low, high = (float(v) for v in np.percentile(values, (0.5, 99.5)))
    if high - low >= DISPLAY_MIN_SPREAD or high <= low:
        return planes
    return np.clip((planes - np.float32(low)) / np.float32(high - low), 0.0, 1.0)


def _shown_planes(planes: np.ndarray, spec: PreprocessSpec, ignore: float | None) -> np.ndarray:
    """The planes a view shows (colour, or the first: grey and a dual-energy pair's high energy),
    display-windowed for X-ray."""
    planes = np.asarray(planes, dtype=np.float32)
    planes = planes if planes.shape[0] == 3 else planes[:1]
    return display_window(planes, ignore) if spec.modality == "xray" else planes


def _fit(rgb: np.ndarray, max_side: int | None) -> np.ndarray:
    """Shrinks an HxWx3 view so its longer side is at most max_side (as heatmap_png does)."""
    if max_side is None or max(rgb.shape[:2]) <= max_side:
        return rgb
    factor = max_side / max(rgb.shape[:2])
    size = (max(1, round(rgb.shape[1] * factor)), max(1, round(rgb.shape[0] * factor)))
    return np.asarray(Image.fromarray(rgb).resize(size, Image.Resampling.BILINEAR))


def view_rgb(model_input: np.ndarray, spec: PreprocessSpec, max_side: int | None = 1024) -> np.ndarray:
    """The model input (CxSxS float in [0, 1]) as the HxWx3 uint8 view, the size heatmap_png gives it."""
    # Letterbox padding (air, 1.0) would hold the percentiles of a dim X-ray at white.
    ignore = 1.0 if spec.resize_mode == "letterbox" else None
    return _fit(to_display_rgb(_shown_planes(model_input, spec, ignore)), max_side)


def scan_view_rgb(pixels: np.ndarray, spec: PreprocessSpec, height: int, width: int) -> np.ndarray:
    """A decoded scan (HxW or HxWxC, any depth) as the model's intensities at height x width, as an
    HxWx3 uint8 view. The scan is first thinned by whole rows and columns to about twice that size,
    so a 40 MP 16-bit scan never becomes a 160 MB float image for a 1024 px view."""
    step = max(1, min(pixels.shape[0] // (2 * height), pixels.shape[1] // (2 * width)))
    thinned = pixels[::step, ::step]
    return to_display_rgb(_shown_planes(to_unit_image(thinned, spec, height, width), spec, None))
