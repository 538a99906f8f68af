"""Preprocessing: from decoded pixels (inference/decode.py) to the model's CxSxS float32 input in [0, 1].

`load_for_model` takes the bytes of an upload or a file's path and is the one path evaluation and the
server share, so what the model saw in evaluation is exactly what it sees in service. `to_model_input`
does the same for an image decoded already (a tile of a scan, an augmented training image, a
dual-energy pair from `decode_dual_energy`). Normalization (mean/std) is *not* done here: it is the
model's first layer, inside the checkpoint and the ONNX graph.

The steps, all read from the model's PreprocessSpec: the colour rule (`match_channels`), intensities to
[0, 1] (8-bit by 255, 16-bit and float through the spec's window), the resize (stretch, or letterbox
with 1.0, air in a transmission X-ray, or black for photos), and HxWxC to CxHxW.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from verity.inference.decode import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    open_image,
    pil_to_array,
    read_image_bytes,
)
from verity.inference.spec import PreprocessSpec

# A channel spread (max - min over R, G, B) of at most this many 8-bit levels is JPEG noise on grey
# content: encoding R = G = B through YCbCr and back moves a channel by 1-2 levels, never by 4.
GREY_SPREAD_LEVELS = 3
# An image whose pixels stay within that spread but for this fraction (stray chroma at sharp edges) is grey.
GREY_OUTLIER_FRACTION = 0.001


def is_grey_content(image: np.ndarray) -> bool:
    """Whether an HxWx3 image is grey content stored as colour (R = G = B up to JPEG noise).

    Most X-ray files that leave a scanner console are such RGB-encoded grey; pseudo-colour exports
    (orange organic, green mixed, blue metal) spread their channels by tens of levels.
    """
    if image.ndim != 3 or image.shape[2] != 3:
        return False
    levels = 1.0 if image.dtype == np.uint8 else (257.0 if image.dtype == np.uint16 else 1 / 255)
    spread = image.max(axis=2).astype(np.float32) - image.min(axis=2).astype(np.float32)
    outliers = np.count_nonzero(spread > GREY_SPREAD_LEVELS * levels)
    return outliers <= GREY_OUTLIER_FRACTION * spread.size


def _luma(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 image, HxWx1 of the same dtype.

    8-bit uses PIL's own fixed-point formula ("L" conversion), so R = G = B = v gives exactly v and an
    RGB JPEG of grey content lands on the numbers of the same image saved as grey.
    """
    if image.dtype == np.uint8:
        weighted = image[..., 0].astype(np.uint32) * 19595 + image[..., 1].astype(np.uint32) * 38470
        weighted += image[..., 2].astype(np.uint32) * 7471 + 0x8000
        return (weighted >> 16).astype(np.uint8)[..., None]
    luma = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
    return luma.astype(image.dtype)[..., None]


def match_channels(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Brings a decoded HxWxC image to the model's channels: the colour rule of the spec module.

    Grey content is one plane whatever its encoding: for an X-ray model, RGB-encoded grey becomes its
    luma plane first, so the grey PNG and its RGB JPEG give the same tensor. A 1-channel model sees
    colour as luma; a 3-channel model keeps colour (a pseudo-colour scan's hue is its material) and
    sees a grey plane repeated three times. A single-energy model given a dual-energy pair sees the
    high-energy image, which is what a single-energy scanner records.
    """
    if image.ndim == 2:
        image = image[..., None]
    in_chans, channels = spec.in_chans, image.shape[2]
    if channels == 4:
        image, channels = image[..., :3], 3
    if channels == 3 and (in_chans == 1 or (spec.modality == "xray" and is_grey_content(image))):
        image, channels = _luma(image), 1
    if channels == 2 and in_chans != 2:
        image, channels = image[..., :1], 1
    if channels == in_chans:
        return image
    if channels == 1 and in_chans == 3:
        return np.repeat(image, 3, axis=2)
    raise DecodeError(
        f"The image has {channels} channel(s) but the model needs {in_chans}"
        + (" (a dual-energy high/low pair)." if in_chans == 2 else ".")
    )


def _to_unit_range(image: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Maps intensities to float32 [0, 1]: 8-bit by 255, deeper images through the window."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if window is None:
        low, high = (0.0, 65535.0) if image.dtype == np.uint16 else (0.0, 1.0)
    else:
        low, high = window
    scaled = (image.astype(np.float32) - np.float32(low)) / np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0)


_PIL_FILTERS = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
    "area": Image.Resampling.BOX,
}


def _target_shape(height: int, width: int, spec: PreprocessSpec) -> tuple[int, int]:
    size = spec.image_size
    if spec.resize_mode == "stretch":
        return size, size
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _resize_unit(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    """Resizes an HxWxC float32 image channel by channel (PIL 'F' mode keeps full precision)."""
    if image.shape[:2] == (height, width):
        return image
    resample = _PIL_FILTERS[interpolation]
    planes = [
        np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c])).resize((width, height), resample))
        for c in range(image.shape[2])
    ]
    return np.stack(planes, axis=2)


def _uint8_to_model_input(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An 8-bit "L" or "RGB" image to CxSxS float32: resized in uint8 (PIL's fast path), then scaled
    and transposed in one pass."""
    height, width = _target_shape(image.height, image.width, spec)
    if image.size != (width, height):
        image = image.resize((width, height), _PIL_FILTERS[spec.interpolation])
    pixels = np.asarray(image)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    # Transposing the uint8 pixels before the float32 division moves a quarter of the bytes; the
    # numbers are those of astype(np.float32) / 255.
    chw = np.ascontiguousarray(pixels.transpose(2, 0, 1)) / np.float32(255.0)
    return _letterbox(chw, spec) if spec.resize_mode == "letterbox" else chw


def _is_plain_uint8(image: Image.Image, spec: PreprocessSpec) -> bool:
    # An X-ray RGB image must first be checked for grey content (match_channels), so it takes the array path.
    plain = {("RGB", 3), ("L", 1)} if spec.modality == "photo" else {("L", 1)}
    return (image.mode, spec.in_chans) in plain


def to_model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turns a decoded HxWxC image into the model's CxSxS float32 input in [0, 1]."""
    image = match_channels(image, spec)
    if image.dtype == np.uint8 and spec.in_chans in (1, 3):
        return _uint8_to_model_input(Image.fromarray(image if spec.in_chans == 3 else image[..., 0]), spec)
    height, width = _target_shape(image.shape[0], image.shape[1], spec)
    resized = _resize_unit(_to_unit_range(image, spec.window), height, width, spec.interpolation)
    chw = np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)
    return _letterbox(chw, spec) if spec.resize_mode == "letterbox" else chw


def _letterbox(chw: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    size = spec.image_size
    pad_value = 1.0 if spec.modality == "xray" else 0.0  # air in a transmission image; black for photos
    canvas = np.full((chw.shape[0], size, size), pad_value, dtype=np.float32)
    top = (size - chw.shape[1]) // 2
    left = (size - chw.shape[2]) // 2
    canvas[:, top : top + chw.shape[1], left : left + chw.shape[2]] = chw
    return canvas


def load_for_model(
    source: bytes | str | Path, spec: PreprocessSpec, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The bytes of an upload, or a file, to the model input: the function evaluation and serving use.

    The numbers are those of `to_model_input(decode_image(data, limits, spec.image_size), spec)`,
    computed faster for the common case of an 8-bit photo: the decoded PIL image is resized directly
    instead of going through an array and back (tests/test_decode_speed_path.py).
    """
    decoded = open_image(read_image_bytes(source, limits), limits, draft_size=spec.image_size)
    if isinstance(decoded, np.ndarray):
        return to_model_input(decoded, spec)
    if _is_plain_uint8(decoded, spec):
        return _uint8_to_model_input(decoded, spec)
    return to_model_input(pil_to_array(decoded), spec)
