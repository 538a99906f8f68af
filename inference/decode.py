"""Image decoding and preprocessing: the one path from file bytes to a model input.

`load_for_model` is used by the evaluation loader and by the server alike, so what the model saw in
evaluation is exactly what it sees in service. Normalization (mean/std) is *not* done here: it is the
model's first layer, inside the checkpoint and the ONNX graph.

Intensities: 8-bit images map 0..255 to [0, 1]; 16-bit and float images go through the spec's window.
X-ray images are transmission images (bright = little attenuation), so letterbox padding is 1.0 (air).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from inference.spec import PreprocessSpec

# We check the pixel count ourselves, before decoding, with our own limit and message.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The bytes are not an image we can read. `code` is a short machine-readable reason."""

    code = "undecodable_image"


class UnsupportedFormat(DecodeError):
    code = "unsupported_media_type"


class ImageTooLarge(DecodeError):
    code = "image_too_large"


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 * 1024 * 1024
    # 6000x4000 phone photos and 4096-px scans pass; a decompression bomb does not.
    max_pixels: int = 40_000_000


DEFAULT_LIMITS = DecodeLimits()

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"GIF87a", "gif"),
    (b"GIF89a", "gif"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),
    (b"MM\x00+", "tiff"),
    (b"BM", "bmp"),
)


def sniff_format(data: bytes) -> str:
    """Names the container format from the first bytes; the file name is never trusted."""
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    if not data:
        raise DecodeError("The upload is empty.")
    raise UnsupportedFormat(
        "Not a supported image: expected JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM (checked by content, "
        "not by file name)."
    )


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"The image declares an empty size {width}x{height}.")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}."
        )


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Converts a PIL image to HxWxC: uint8 for 8-bit modes, uint16 or float32 for deeper ones."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L"):
        return np.asarray(image, dtype=np.uint16)[..., None]
    if mode == "I":
        array = np.asarray(image, dtype=np.int32)
        return np.clip(array, 0, 65535).astype(np.uint16)[..., None]
    if mode == "F":
        return np.asarray(image, dtype=np.float32)[..., None]
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        # Transparent regions are composited onto white, as a label printed on paper would look.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba).convert("RGB")
    elif mode not in ("L", "RGB"):
        image = image.convert("RGB")  # P, CMYK, YCbCr, 1 and the rest
    array = np.asarray(image, dtype=np.uint8)
    return array[..., None] if array.ndim == 2 else array


def _decode_pil(data: bytes, limits: DecodeLimits, draft_size: int | None) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data))
        _check_pixels(image.width, image.height, limits)
        if draft_size and image.format == "JPEG":
            # Let libjpeg decode at 1/2, 1/4 or 1/8 scale while staying at least draft_size on each side.
            image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", (draft_size, draft_size))
        image.seek(0)  # first frame of an animation
        image = ImageOps.exif_transpose(image)
        return _pil_to_array(image)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as error:
        if isinstance(error, DecodeError):
            raise
        raise DecodeError(f"The image could not be decoded: {error}") from error


def _decode_tiff(data: bytes, limits: DecodeLimits) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            page = tiff.pages[0]
            shape = page.shape
            height, width = (shape[0], shape[1]) if page.samplesperpixel > 1 and len(shape) == 3 else shape[-2:]
            _check_pixels(int(width), int(height), limits)
            array = page.asarray()
    except DecodeError:
        raise
    except Exception as error:  # tifffile raises many types for corrupt files
        raise DecodeError(f"The TIFF could not be decoded: {error}") from error
    if array.ndim == 2:
        array = array[..., None]
    if array.dtype == np.uint8 or array.dtype == np.uint16:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 65535).astype(np.uint16)
    raise UnsupportedFormat(f"TIFF sample type {array.dtype} is not supported.")


def _decode_dicom(data: bytes, limits: DecodeLimits) -> np.ndarray:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        _check_pixels(int(dataset.Columns), int(dataset.Rows), limits)
        pixels = apply_modality_lut(dataset.pixel_array, dataset)  # rescale slope/intercept
        if "WindowCenter" in dataset or "VOILUTSequence" in dataset:
            windowed = apply_voi_lut(pixels, dataset).astype(np.float32)
            low, high = float(windowed.min()), float(windowed.max())
            pixels = (windowed - low) / (high - low) if high > low else np.zeros_like(windowed)
        else:
            pixels = pixels.astype(np.float32)
            low, high = float(pixels.min()), float(pixels.max())
            pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
        if getattr(dataset, "PhotometricInterpretation", "") == "MONOCHROME1":
            pixels = 1.0 - pixels  # MONOCHROME1 shows high values dark; we want transmission bright
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError(f"The DICOM object could not be decoded: {error}") from error
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.ndim == 3 and pixels.shape[0] == 2 and dataset.get("NumberOfFrames", 1) == 2:
        return np.moveaxis(pixels, 0, -1)  # two frames: dual-energy high/low
    return pixels[..., None] if pixels.ndim == 2 else pixels


def decode_image(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None) -> np.ndarray:
    """Decodes image bytes to an HxWxC array (uint8, uint16 or float32), orientation applied.

    `draft_size` lets a JPEG be decoded at reduced scale when the model needs far fewer pixels.
    Raises DecodeError (or a subclass) with a message fit to show a user.
    """
    if len(data) > limits.max_bytes:
        raise ImageTooLarge(f"The file is {len(data):,} bytes; the limit is {limits.max_bytes:,}.")
    kind = sniff_format(data)
    if kind == "tiff":
        return _decode_tiff(data, limits)
    if kind == "dicom":
        return _decode_dicom(data, limits)
    return _decode_pil(data, limits, draft_size)


def _match_channels(image: np.ndarray, in_chans: int) -> np.ndarray:
    channels = image.shape[2]
    if channels == in_chans:
        return image
    if in_chans == 3 and channels == 1:
        return np.repeat(image, 3, axis=2)
    if in_chans == 1 and channels in (3, 4):
        # ITU-R 601 luma, as PIL's "L" conversion uses
        luma = image[..., 0] * 0.299 + image[..., 1] * 0.587 + image[..., 2] * 0.114
        return luma.astype(np.float32 if image.dtype != np.uint8 else np.float32)[..., None]
    if in_chans == 3 and channels == 4:
        return image[..., :3]
    if in_chans == 3 and channels == 2:
        return np.repeat(image[..., :1], 3, axis=2)
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


def _resize_uint8(image: np.ndarray, height: int, width: int, interpolation: str) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    mode = "RGB" if image.shape[2] == 3 else "L"
    pil = Image.fromarray(image if mode == "RGB" else image[..., 0], mode)
    resized = np.asarray(pil.resize((width, height), _PIL_FILTERS[interpolation]))
    return resized if resized.ndim == 3 else resized[..., None]


def to_model_input(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """Turns a decoded HxWxC image into the model's CxSxS float32 input in [0, 1]."""
    if image.ndim == 2:
        image = image[..., None]
    image = _match_channels(image, spec.in_chans)
    height, width = _target_shape(image.shape[0], image.shape[1], spec)
    if image.dtype == np.uint8 and spec.in_chans in (1, 3):
        # 8-bit: resize in uint8 (fast path in PIL), then scale.
        resized = _resize_uint8(image, height, width, spec.interpolation).astype(np.float32) / 255.0
    else:
        resized = _resize_unit(_to_unit_range(image, spec.window), height, width, spec.interpolation)
    if spec.resize_mode == "letterbox":
        resized = _letterbox(resized, spec)
    return np.ascontiguousarray(resized.transpose(2, 0, 1), dtype=np.float32)


def _letterbox(image: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    size = spec.image_size
    pad_value = 1.0 if spec.modality == "xray" else 0.0  # air in a transmission image; black for photos
    canvas = np.full((size, size, image.shape[2]), pad_value, dtype=np.float32)
    top = (size - image.shape[0]) // 2
    left = (size - image.shape[1]) // 2
    canvas[top : top + image.shape[0], left : left + image.shape[1]] = image
    return canvas


def load_for_model(
    source: bytes | str | Path, spec: PreprocessSpec, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode and preprocess in one call: the function both evaluation and serving use."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else source
    return to_model_input(decode_image(data, limits, draft_size=spec.image_size), spec)
