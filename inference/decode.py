"""Image decoding: the bytes of an upload or a file to its pixels, an HxWxC numpy array.

Turning those pixels into a model input (colour rule, intensity window, resize) is
inference/preprocess.py; this module knows nothing of models.

Formats: JPEG (EXIF orientation applied, CMYK converted), PNG (8/16-bit, palette, alpha), WebP, GIF
(first frame), BMP, TIFF (8/16-bit, float, CMYK, palette; two pages or two samples = dual energy) and
DICOM/DICOS (rescale slope/intercept and windowing applied; two frames = dual energy). A dual-energy
X-ray is HxWx2: channel 0 the high-energy image, channel 1 the low-energy image.

Intensities are kept as stored: uint8 for 8-bit images, uint16 for 16-bit ones, float32 for float
TIFFs. DICOM comes out as float32 already windowed to [0, 1] by the file's own rescale and VOI
transform (inference/dicom_intensity.py).

Limits are checked from the header, before any pixel is decoded, so a decompression bomb costs nothing.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from verity.inference.dicom_intensity import dicom_grey_to_unit

# We check the pixel count ourselves, before decoding, with our own limit and message.
Image.MAX_IMAGE_PIXELS = None


class DecodeError(ValueError):
    """The bytes are not an image we can read. `code` is a short machine-readable reason."""

    code = "undecodable_image"


class UnsupportedFormat(DecodeError):
    """A container or encoding we do not read (HTTP 415)."""

    code = "unsupported_media_type"


class ImageTooLarge(DecodeError):
    """The file or its declared pixel count exceeds the limits (HTTP 413)."""

    code = "image_too_large"


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 * 1024 * 1024
    # 6000x4000 phone photos and 4096-px scans pass; a decompression bomb does not.
    max_pixels: int = 40_000_000


DEFAULT_LIMITS = DecodeLimits()

SUPPORTED_FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM/DICOS"

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
    if len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in (b"heic", b"heix", b"avif", b"mif1"):
        raise UnsupportedFormat(f"HEIC/AVIF images are not supported: send {SUPPORTED_FORMATS}.")
    raise UnsupportedFormat(
        f"Not a supported image: expected {SUPPORTED_FORMATS} (checked by content, not by file name)."
    )


def _check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"The image declares an empty size {width}x{height}.")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}."
        )


def _check_bytes(size: int, limits: DecodeLimits) -> None:
    if size > limits.max_bytes:
        raise ImageTooLarge(f"The file is {size:,} bytes; the limit is {limits.max_bytes:,}.")


# ---------------------------------------------------------------------------------------------- PIL


def _composite_on_white(image: Image.Image, mode: str) -> Image.Image:
    # Transparent regions become white, as a label printed on paper would look.
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert(mode)


def _cmyk_to_rgb(image: Image.Image) -> Image.Image:
    """Uses the embedded ICC profile when there is one (print files carry it); else PIL's formula."""
    profile = image.info.get("icc_profile")
    if profile:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(profile))
            srgb = ImageCms.createProfile("sRGB")
            converted = ImageCms.profileToProfile(image, source, srgb, outputMode="RGB")
            if converted is not None:
                return converted
        except (ImportError, OSError, ValueError, ImageCms.PyCMSError):
            pass  # a broken profile is no reason to refuse the image
    return image.convert("RGB")


@contextlib.contextmanager
def _pil_errors() -> Iterator[None]:
    """Pillow raises OSError, SyntaxError, struct.error... for corrupt files: all become DecodeError."""
    try:
        yield
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError(f"The image could not be decoded: {error}") from error


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image (from `open_image`) as HxWxC: uint8 for 8-bit modes, uint16 or float32 for deeper ones."""
    with _pil_errors():
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            return np.asarray(image, dtype=np.uint16)[..., None]
        if mode == "I":
            array = np.asarray(image, dtype=np.int32)
            return np.clip(array, 0, 65535).astype(np.uint16)[..., None]
        if mode == "F":
            return _finite(np.asarray(image, dtype=np.float32)[..., None])
        if mode in ("LA", "La"):
            image = _composite_on_white(image, "L")
        elif mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
            image = _composite_on_white(image, "RGB")
        elif mode == "CMYK":
            image = _cmyk_to_rgb(image)
        elif mode == "1":
            image = image.convert("L")
        elif mode not in ("L", "RGB"):
            image = image.convert("RGB")  # P, YCbCr, LAB, HSV, RGBX
        array = np.asarray(image, dtype=np.uint8)
        return array[..., None] if array.ndim == 2 else array


def _open_pil(data: bytes, limits: DecodeLimits, draft_size: int | None) -> Image.Image:
    """The decoded, upright PIL image (any mode); `pil_to_array` turns it into our HxWxC array."""
    image = Image.open(io.BytesIO(data))
    _check_pixels(image.width, image.height, limits)
    if draft_size and image.format == "JPEG":
        # libjpeg decodes at 1/2, 1/4 or 1/8 scale, keeping the LONG side at least draft_size: most of
        # the speed of serving a photo comes from here (a 1024x768 photo decodes at 256x192 for a
        # 224-px model, about half the cost of 512x384 plus its resize).
        scale = draft_size / max(image.width, image.height)
        request = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image.draft(image.mode if image.mode in ("RGB", "L") else "RGB", request)
        # Hand libjpeg the whole file in one read instead of 64 KB blocks: fewer Python round trips
        # (about 0.15 ms of a 4 ms photo here); the bytes are in memory already.
        image.decodermaxblock = max(image.decodermaxblock, len(data))
    image.seek(0)  # first frame of an animation
    image.load()
    _apply_exif_orientation(image)
    return image


def _decode_pil(data: bytes, limits: DecodeLimits, draft_size: int | None) -> np.ndarray:
    with _pil_errors():
        return pil_to_array(_open_pil(data, limits, draft_size))


def _apply_exif_orientation(image: Image.Image) -> None:
    """Turns the pixels upright per EXIF; a damaged EXIF block is ignored rather than losing the photo."""
    with contextlib.suppress(Exception):  # any EXIF parsing failure means "orientation unknown"
        ImageOps.exif_transpose(image, in_place=True)


# --------------------------------------------------------------------------------------------- TIFF

_TIFF_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette", 5: "separated"}


def _finite(array: np.ndarray) -> np.ndarray:
    """NaN and infinities (seen in float scans with dead pixels) would poison every later step."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    return array


def _to_supported_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.floating):
        return _finite(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 65535).astype(np.uint16)
    raise UnsupportedFormat(f"TIFF sample type {array.dtype} is not supported.")


def _invert(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return np.iinfo(array.dtype).max - array
    return 1.0 - array


def _separated_to_rgb(array: np.ndarray) -> np.ndarray:
    """CMYK ink coverage to RGB: R = (1 - C)(1 - K), the same formula PIL uses without a profile."""
    full = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    ink = array[..., :4].astype(np.float32) / full
    rgb = (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
    if array.dtype == np.uint8:
        return np.round(rgb * 255.0).astype(np.uint8)
    if array.dtype == np.uint16:
        return np.round(rgb * 65535.0).astype(np.uint16)
    return rgb.astype(np.float32)


def _drop_alpha(array: np.ndarray, colour_samples: int) -> np.ndarray:
    """Composites an alpha sample onto white, as the PIL path does."""
    full = float(np.iinfo(array.dtype).max) if np.issubdtype(array.dtype, np.integer) else 1.0
    colour = array[..., :colour_samples].astype(np.float32)
    alpha = array[..., colour_samples : colour_samples + 1].astype(np.float32) / full
    out = colour * alpha + full * (1.0 - alpha)
    return np.round(out).astype(array.dtype) if np.issubdtype(array.dtype, np.integer) else out


def _tiff_page_array(page) -> np.ndarray:  # noqa: ANN001 - tifffile.TiffPage
    """One TIFF page as HxWxC in the photometric meaning of its samples."""
    array = page.asarray()
    if page.samplesperpixel > 1 and page.planarconfig == 2:  # separate planes: SYX -> YXS
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise UnsupportedFormat(f"TIFF pages of shape {array.shape} (volumes) are not supported.")
    photometric = _TIFF_PHOTOMETRIC.get(int(page.photometric))
    extrasamples = tuple(int(x) for x in (page.extrasamples or ()))
    has_alpha = bool(extrasamples) and extrasamples[0] in (1, 2)
    if photometric == "palette":
        colormap = page.colormap  # 3 x 2**bits, 16-bit entries
        rgb = np.moveaxis(colormap[:, array[..., 0]], 0, -1)
        return (rgb >> 8).astype(np.uint8) if colormap.max() > 255 else rgb.astype(np.uint8)
    if photometric == "separated":
        return _separated_to_rgb(array)
    if photometric == "rgb":
        return _drop_alpha(array, 3) if has_alpha and array.shape[2] >= 4 else array[..., :3]
    if photometric == "miniswhite":
        array = _invert(array)
    if array.shape[2] == 2 and has_alpha:
        return _drop_alpha(array, 1)
    # Two samples with no alpha meaning: a dual-energy high/low pair. More: keep the first.
    return array if array.shape[2] <= 2 else array[..., :1]


def _tiff_pages_to_read(tiff, limits: DecodeLimits) -> list:  # noqa: ANN001 - tifffile.TiffFile
    first = tiff.pages[0]
    pages = [first]
    if first.samplesperpixel == 1 and len(tiff.pages) >= 2:
        second = tiff.pages[1]
        # Two full-size single-sample pages: a dual-energy high/low pair. A smaller second page is a
        # thumbnail or a pyramid level and is ignored.
        if getattr(second, "shape", None) == first.shape and second.samplesperpixel == 1:
            pages.append(second)
    for page in pages:
        _check_pixels(int(page.imagewidth), int(page.imagelength), limits)
    return pages


def _decode_tiff(data: bytes, limits: DecodeLimits) -> np.ndarray:
    import tifffile

    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tiff:
            pages = _tiff_pages_to_read(tiff, limits)
            planes = [_tiff_page_array(page) for page in pages]
    except DecodeError:
        raise
    except Exception as error:  # tifffile raises many types for corrupt files and missing codecs
        if "imagecodecs" in str(error) or "compression" in str(error).lower():
            # LZW, PackBits and JPEG-in-TIFF need imagecodecs in tifffile; Pillow's libtiff reads them.
            return _decode_pil(data, limits, None)
        raise DecodeError(f"The TIFF could not be decoded: {error}") from error
    array = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
    return _to_supported_dtype(array)


# -------------------------------------------------------------------------------------------- DICOM


def _read_dicom(data: bytes, limits: DecodeLimits):  # noqa: ANN202 - (dataset, pixels)
    import pydicom

    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
    except Exception as error:
        raise DecodeError(f"The DICOM object could not be read: {error}") from error
    if not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DecodeError("The DICOM object holds no image (no Pixel Data element).")
    _check_pixels(int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0), limits)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 2:
        raise UnsupportedFormat(
            f"The DICOM object has {frames} frames; only single images and dual-energy pairs (2 frames) "
            "are supported."
        )
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID", "unknown")
        name = getattr(syntax, "name", str(syntax))
        raise UnsupportedFormat(f"DICOM transfer syntax {name} cannot be decoded here: {error}") from error
    except Exception as error:
        raise DecodeError(f"The DICOM pixel data could not be decoded: {error}") from error
    return dataset, pixels


def _decode_dicom(data: bytes, limits: DecodeLimits) -> np.ndarray:
    dataset, pixels = _read_dicom(data, limits)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if int(dataset.get("SamplesPerPixel", 1)) > 1:  # colour (secondary capture photos): as RGB
        colour = pixels[0] if frames > 1 else pixels
        return _to_supported_dtype(np.ascontiguousarray(colour[..., :3]))
    try:
        unit = dicom_grey_to_unit(pixels, dataset)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DecodeError(f"The DICOM intensity transforms could not be applied: {error}") from error
    if frames == 2:
        return np.ascontiguousarray(np.moveaxis(unit, 0, -1))  # frames: high energy, low energy
    return unit[..., None]


# ------------------------------------------------------------------------------------------- public


def open_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None
) -> Image.Image | np.ndarray:
    """`decode_image`, stopping short of the array for formats Pillow reads: TIFF and DICOM (their own
    readers) come back as the HxWxC array, everything else as the loaded, upright PIL image, so a caller
    that resizes an 8-bit image can do so in PIL, its fast path (`preprocess.load_for_model`)."""
    _check_bytes(len(data), limits)
    kind = sniff_format(data)
    if kind == "tiff":
        return _decode_tiff(data, limits)
    if kind == "dicom":
        return _decode_dicom(data, limits)
    with _pil_errors():
        return _open_pil(data, limits, draft_size)


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None
) -> np.ndarray:
    """Decodes image bytes to an HxWxC array (uint8, uint16 or float32), orientation applied.

    C is 1 (grey), 2 (dual-energy high/low) or 3 (RGB; alpha is composited onto white). `draft_size`
    lets a JPEG be decoded at reduced scale when the model needs far fewer pixels. Raises DecodeError
    (or a subclass) with a message fit to show a user.
    """
    decoded = open_image(data, limits, draft_size)
    return pil_to_array(decoded) if isinstance(decoded, Image.Image) else decoded


def read_image_bytes(source: bytes | str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an upload or a file; a file over the size limit is refused before it is read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    _check_bytes(path.stat().st_size, limits)
    return path.read_bytes()


def _single_plane(image: np.ndarray, which: str) -> np.ndarray:
    if image.shape[2] == 1:
        return image[..., 0]
    grey_as_rgb = image.shape[2] == 3 and bool((image == image[..., :1]).all())
    if grey_as_rgb:
        return image[..., 0]  # a grey image saved as RGB
    raise DecodeError(
        f"The {which}-energy image has {image.shape[2]} channels; each image of a dual-energy pair must be "
        "a single grey channel."
    )


def _unit_float(plane: np.ndarray) -> np.ndarray:
    if plane.dtype == np.uint8:
        return plane.astype(np.float32) / 255.0
    if plane.dtype == np.uint16:
        return plane.astype(np.float32) / 65535.0
    return plane.astype(np.float32)


def decode_dual_energy(
    high: bytes | str | Path, low: bytes | str | Path, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decodes a high/low energy pair (two uploads or files) to HxWx2: channel 0 high, channel 1 low.

    Both must be single-channel and the same size. Same integer type: kept; otherwise both become float32
    in [0, 1] (8-bit / 255, 16-bit / 65535, DICOM already windowed). `preprocess.to_model_input` makes
    the pair a model input.
    """
    high_plane = _single_plane(decode_image(read_image_bytes(high, limits), limits), "high")
    low_plane = _single_plane(decode_image(read_image_bytes(low, limits), limits), "low")
    if high_plane.shape != low_plane.shape:
        raise DecodeError(
            f"The high- and low-energy images differ in size: {high_plane.shape[1]}x{high_plane.shape[0]} "
            f"and {low_plane.shape[1]}x{low_plane.shape[0]}."
        )
    if high_plane.dtype != low_plane.dtype or high_plane.dtype == np.float32:
        high_plane, low_plane = _unit_float(high_plane), _unit_float(low_plane)
    return np.stack([high_plane, low_plane], axis=2)
