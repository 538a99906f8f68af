"""Preprocessing: from decoded pixels (inference/decode.py) to the model's CxSxS float32 input in [0, 1].

`load_for_model` takes the bytes of an upload or a file's path and is the one path evaluation and the
server share, so what the model saw in evaluation is exactly what it sees in service. `to_model_input`
does the same for an image decoded already (a tile of a scan, an augmented training image, a
dual-energy pair from `inference/dual_energy.py`). Normalization (mean/std) is *not* done here: it is
the model's first layer, inside the checkpoint and the ONNX graph.

The steps, all read from the model's PreprocessSpec: the colour rule (`match_channels`), intensities to
[0, 1] (8-bit by 255, 16-bit and float through the spec's window), the resize (stretch, or letterbox
with 1.0, air in a transmission X-ray, or black for photos), and HxWxC to CxHxW.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from verity.inference.colour import band_rows, by_bands
from verity.inference.decode import open_image, pil_to_array, read_image_bytes, sniff_format
from verity.inference.decode_limits import DEFAULT_LIMITS, DecodeError, DecodeLimits
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
    outliers, step = 0, band_rows(image.shape[1])
    for top in range(0, image.shape[0], step):  # float copies of a band, not of a 40 MP scan
        red, green, blue = (image[top : top + step, :, channel] for channel in range(3))
        # Elementwise across the three planes: the same numbers as band.max(axis=2), five times faster
        # than a reduction over an axis of three.
        high = np.maximum(np.maximum(red, green), blue).astype(np.float32)
        spread = high - np.minimum(np.minimum(red, green), blue).astype(np.float32)
        outliers += int(np.count_nonzero(spread > GREY_SPREAD_LEVELS * levels))
    return outliers <= GREY_OUTLIER_FRACTION * image.shape[0] * image.shape[1]


# The longer side a colour check looks at: grey content stays grey when shrunk, and colour stays colour.
COLOUR_CHECK_SIDE = 256


def is_colour_content(image: np.ndarray | Image.Image) -> bool:
    """Whether a decoded image (array or PIL) holds colour: three or more channels that are not grey
    content (`is_grey_content`). What the open-set gate compares with the training images' colour; a
    one-plane image and a dual-energy pair are not colour. Checked on a view of at most
    COLOUR_CHECK_SIDE pixels a side."""
    if isinstance(image, Image.Image):
        if image.mode in ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"):
            return False
        view = image.convert("RGB")
        view.thumbnail((COLOUR_CHECK_SIDE, COLOUR_CHECK_SIDE), Image.Resampling.NEAREST)
        return not is_grey_content(np.asarray(view))
    if image.ndim != 3 or image.shape[2] < 3:
        return False
    step = max(1, max(image.shape[:2]) // COLOUR_CHECK_SIDE)
    return not is_grey_content(image[::step, ::step, :3])


def _luma(image: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma of an HxWx3 image, HxWx1 of the same dtype.

    8-bit uses PIL's own fixed-point formula ("L" conversion), so R = G = B = v gives exactly v and an
    RGB JPEG of grey content lands on the numbers of the same image saved as grey.
    """

    def convert(band: np.ndarray) -> np.ndarray:
        if band.dtype == np.uint8:
            weighted = band[..., 0].astype(np.uint32) * 19595 + band[..., 1].astype(np.uint32) * 38470
            weighted += band[..., 2].astype(np.uint32) * 7471 + 0x8000
            return (weighted >> 16).astype(np.uint8)[..., None]
        luma = band[..., 0] * 0.299 + band[..., 1] * 0.587 + band[..., 2] * 0.114
        return luma.astype(band.dtype)[..., None]

    return by_bands(convert, image, 1, image.dtype)  # 32-bit working copies of a band, not of the image


def match_channels(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Brings a decoded HxWxC image to the model's channels: the colour rule of the spec module.

    Grey content is one plane whatever its encoding: for an X-ray model, RGB-encoded grey becomes its
    luma plane first, so the grey PNG and its RGB JPEG give the same tensor. A 1-channel model sees
    colour as luma; a 3-channel model keeps colour (a pseudo-colour scan's hue is its material) and
    sees a grey plane repeated three times. A single-energy model given a dual-energy pair sees the
    high-energy image, which is what a single-energy scanner records.
    """
    image = _fewest_channels(image, spec)
    return np.repeat(image, 3, axis=2) if image.shape[2] < spec.in_chans else image


def _fewest_channels(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """`match_channels` short of repeating a grey plane for a 3-channel model: the plane is repeated
    after the resize (`to_model_input`), on the model input rather than on a 40 MP image."""
    if image.ndim == 2:
        image = image[..., None]
    in_chans, channels = spec.in_chans, image.shape[2]
    if channels == 4:
        image, channels = image[..., :3], 3
    if channels == 3 and (in_chans == 1 or (spec.modality == "xray" and is_grey_content(image))):
        image, channels = _luma(image), 1
    if channels == 2 and in_chans != 2:
        image, channels = image[..., :1], 1
    if channels == in_chans or (channels == 1 and in_chans == 3):
        return image
    raise DecodeError(
        f"The image has {channels} channel(s) but the model needs {in_chans}"
        + (" (a dual-energy high/low pair)." if in_chans == 2 else ".")
    )


def _to_unit_range(plane: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """Maps one plane's intensities to float32 [0, 1]: 8-bit by 255, deeper images through the window.
    One float copy, worked on in place: a 40 MP plane is 160 MB of float32."""
    scaled = plane.astype(np.float32)
    if plane.dtype == np.uint8:
        scaled /= np.float32(255.0)
        return scaled
    if window is None:
        low, high = (0.0, 65535.0) if plane.dtype == np.uint16 else (0.0, 1.0)
    else:
        low, high = window
    scaled -= np.float32(low)
    scaled /= np.float32(high - low)
    return np.clip(scaled, 0.0, 1.0, out=scaled)


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


def _unit_plane(plane: np.ndarray, height: int, width: int, spec: PreprocessSpec) -> np.ndarray:
    """One plane to float32 [0, 1] at height x width (PIL 'F' mode keeps full precision). The float
    copy is made band by band into the PIL image that is resized, so a 40 MP 16-bit scan costs one
    160 MB float image, not that and its own float array too."""
    if plane.shape == (height, width):
        return _to_unit_range(plane, spec.window)
    if plane.dtype == np.uint8:
        # PIL's own conversion to float in one pass, and the scaling after the resize (it is linear):
        # twice as fast on a 12 MP scan as the banded copy below, the same numbers to 1e-7.
        unit = Image.fromarray(plane).convert("F")
        levels = np.array(unit.resize((width, height), _PIL_FILTERS[spec.interpolation]))
        levels /= np.float32(255.0)
        return levels
    unit = Image.new("F", (plane.shape[1], plane.shape[0]))
    step = band_rows(plane.shape[1])
    for top in range(0, plane.shape[0], step):
        unit.paste(Image.fromarray(_to_unit_range(plane[top : top + step], spec.window)), (0, top))
    return np.asarray(unit.resize((width, height), _PIL_FILTERS[spec.interpolation]))


def _uint8_to_model_input(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """An 8-bit image that `_resized_in_uint8` allows to CxSxS float32: resized in uint8 (PIL's fast
    path), then scaled and transposed in one pass."""
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


def _resized_in_uint8(image: np.ndarray, spec: PreprocessSpec) -> bool:
    """Whether an image (after `_fewest_channels`) is resized in uint8 rather than in float.

    Resizing in uint8 rounds every new pixel to a whole level: a 32 px patch enlarged to the input
    size keeps steps of 1/255 that the same patch saved as 16-bit, resized in float, does not have. An
    X-ray's grey plane is therefore resized in float whatever its depth, so a console's 8-bit and
    16-bit files of one scan give the same tensor (tests/test_xray_encodings.py). Colour keeps the fast
    uint8 path (the common 8-bit photo), and so does a photo model's grey plane, because training
    repeats it into three uint8 planes (training.augment.Augmenter) that take that path.
    """
    if image.dtype != np.uint8:
        return False
    return image.shape[2] == 3 or (image.shape[2] == 1 and spec.modality == "photo")


def _is_plain_uint8(image: Image.Image, spec: PreprocessSpec) -> bool:
    # An X-ray RGB image must first be checked for grey content (match_channels), and an X-ray's grey
    # plane is resized in float (`_resized_in_uint8`), so X-ray images take the array path.
    return spec.modality == "photo" and (image.mode, spec.in_chans) in {("RGB", 3), ("L", 1)}


def to_model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turns a decoded HxWxC image into the model's CxSxS float32 input in [0, 1]."""
    image = _fewest_channels(image, spec)
    if _resized_in_uint8(image, spec):
        chw = _uint8_to_model_input(Image.fromarray(image[..., 0] if image.shape[2] == 1 else image), spec)
    else:
        height, width = _target_shape(image.shape[0], image.shape[1], spec)
        chw = np.stack([_unit_plane(image[..., c], height, width, spec) for c in range(image.shape[2])])
        chw = _letterbox(chw, spec) if spec.resize_mode == "letterbox" else chw
    # A grey plane for a 3-channel model, repeated now: resizing it once gives the numbers of resizing
    # three equal planes (per-channel resampling), at a third of the work and memory.
    return np.repeat(chw, 3, axis=0) if chw.shape[0] < spec.in_chans else chw


def _letterbox(chw: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    size = spec.image_size
    pad_value = 1.0 if spec.modality == "xray" else 0.0  # air in a transmission image; black for photos
    canvas = np.full((chw.shape[0], size, size), pad_value, dtype=np.float32)
    top = (size - chw.shape[1]) // 2
    left = (size - chw.shape[2]) // 2
    canvas[:, top : top + chw.shape[1], left : left + chw.shape[2]] = chw
    return canvas


def to_unit_image(image: np.ndarray, spec: PreprocessSpec, height: int, width: int) -> np.ndarray:
    """A decoded HxWxC image as the model's intensities (the colour rule and the window), CxHxW float32
    in [0, 1] resized to height x width as given (not the model's resize rule): what a tiled scan
    looks like to the model, for showing it (inference.heatmap.scan_view_rgb)."""
    image = _fewest_channels(image if image.ndim == 3 else image[..., None], spec)
    return np.stack([_unit_plane(image[..., c], height, width, spec) for c in range(image.shape[2])])


def load_for_model(
    source: bytes | str | Path, spec: PreprocessSpec, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """The bytes of an upload, or a file, to the model input: the function evaluation and serving use.

    The numbers are those of `to_model_input(decode_image(data, limits, spec.image_size), spec)`,
    computed faster for the common case of an 8-bit photo: the decoded PIL image is resized directly
    instead of going through an array and back (tests/test_decode_speed_path.py).
    """
    return load_for_model_sized(source, spec, limits)[0]


def load_for_model_sized(
    source: bytes | str | Path,
    spec: PreprocessSpec,
    limits: DecodeLimits = DEFAULT_LIMITS,
    kind: str | None = None,
) -> tuple[np.ndarray, int, bool]:
    """`load_for_model`, the image's shorter side in its own pixels (what `inference.open_set`'s
    training envelope compares) and whether it held colour before the colour rule (`is_colour_content`).
    `kind`: the format `sniff_format` named, when the caller has it."""
    data = read_image_bytes(source, limits)
    kind = kind or sniff_format(data)
    decoded = open_image(data, limits, draft_size=spec.image_size, kind=kind)
    if isinstance(decoded, Image.Image):
        side = min(decoded.size)
        if side < spec.image_size and kind == "jpeg":
            # A JPEG decoded in draft mode keeps only its long side at the input size: its own short
            # side is in the header (read without decoding, and only for such thin or small ones).
            with Image.open(io.BytesIO(data)) as header:
                side = min(header.size)
        colour = is_colour_content(decoded)
        if _is_plain_uint8(decoded, spec):
            return _uint8_to_model_input(decoded, spec), side, colour
        decoded = pil_to_array(decoded)  # and the PIL image is freed before the model input is made
        return to_model_input(decoded, spec), side, colour
    return to_model_input(decoded, spec), int(min(decoded.shape[:2])), is_colour_content(decoded)
