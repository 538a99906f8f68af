"""Image decoding and preprocessing: the one path from file bytes to a model input.

`load_for_model` is used by the evaluation loader and by the server alike, so what the model saw in
evaluation is exactly what it sees in service. Normalization (mean/std) is *not* done here: it is the
model's first layer, inside the checkpoint and the ONNX graph.

Formats: JPEG (EXIF orientation applied, CMYK converted), PNG (8/16-bit, palette, alpha), WebP, GIF
(first frame), BMP, TIFF (8/16-bit, float, CMYK, palette; two pages or two samples = dual energy) and
DICOM/DICOS (rescale slope/intercept and windowing applied; two frames = dual energy). A dual-energy
X-ray is HxWx2: channel 0 the high-energy image, channel 1 the low-energy image.

Intensities: 8-bit images map 0..255 to [0, 1]; 16-bit and float images go through the spec's window.
DICOM comes out as float32 already windowed to [0, 1]. X-ray images are transmission images (bright =
little attenuation), so letterbox padding is 1.0 (air).

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
from verity.inference.spec import PreprocessSpec

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


def _pil_to_array(image: Image.Image) -> np.ndarray:
    """Converts a PIL image to HxWxC: uint8 for 8-bit modes, uint16 or float32 for deeper ones."""
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


@contextlib.contextmanager
def _pil_errors() -> Iterator[None]:
    """Pillow raises OSError, SyntaxError, struct.error... for corrupt files: all become DecodeError."""
    try:
        yield
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError(f"The image could not be decoded: {error}") from error


def _open_pil(data: bytes, limits: DecodeLimits, draft_size: int | None) -> Image.Image:
    """The decoded, upright PIL image (any mode); `_pil_to_array` turns it into our HxWxC array."""
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
        return _pil_to_array(_open_pil(data, limits, draft_size))


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


def _dicom_grey_to_unit(pixels: np.ndarray, dataset) -> np.ndarray:  # noqa: ANN001 - pydicom Dataset
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
        unit = _dicom_grey_to_unit(pixels, dataset)
    except (ValueError, TypeError, KeyError, AttributeError) as error:
        raise DecodeError(f"The DICOM intensity transforms could not be applied: {error}") from error
    if frames == 2:
        return np.ascontiguousarray(np.moveaxis(unit, 0, -1))  # frames: high energy, low energy
    return unit[..., None]


# ------------------------------------------------------------------------------------------- public


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None
) -> np.ndarray:
    """Decodes image bytes to an HxWxC array (uint8, uint16 or float32), orientation applied.

    C is 1 (grey), 2 (dual-energy high/low) or 3 (RGB; alpha is composited onto white). `draft_size`
    lets a JPEG be decoded at reduced scale when the model needs far fewer pixels. Raises DecodeError
    (or a subclass) with a message fit to show a user.
    """
    _check_bytes(len(data), limits)
    kind = sniff_format(data)
    if kind == "tiff":
        return _decode_tiff(data, limits)
    if kind == "dicom":
        return _decode_dicom(data, limits)
    return _decode_pil(data, limits, draft_size)


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


def decode_dual_energy(high: bytes, low: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Decodes a high/low energy pair (two files) to HxWx2: channel 0 high, channel 1 low.

    Both must be single-channel and the same size. Same integer type: kept; otherwise both become float32
    in [0, 1] (8-bit / 255, 16-bit / 65535, DICOM already windowed).
    """
    high_plane = _single_plane(decode_image(high, limits), "high")
    low_plane = _single_plane(decode_image(low, limits), "low")
    if high_plane.shape != low_plane.shape:
        raise DecodeError(
            f"The high- and low-energy images differ in size: {high_plane.shape[1]}x{high_plane.shape[0]} "
            f"and {low_plane.shape[1]}x{low_plane.shape[0]}."
        )
    if high_plane.dtype != low_plane.dtype or high_plane.dtype == np.float32:
        high_plane, low_plane = _unit_float(high_plane), _unit_float(low_plane)
    return np.stack([high_plane, low_plane], axis=2)


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


def decode_for_model(data: bytes, spec: PreprocessSpec, limits: DecodeLimits = DEFAULT_LIMITS) -> np.ndarray:
    """Bytes to the model input: `to_model_input(decode_image(data, limits, spec.image_size), spec)`.

    The same numbers, computed faster for the common case of an 8-bit photo: the decoded PIL image is
    resized directly instead of going through an array and back (tests/test_decode_speed_path.py).
    """
    _check_bytes(len(data), limits)
    if sniff_format(data) in ("tiff", "dicom"):
        return to_model_input(decode_image(data, limits, draft_size=spec.image_size), spec)
    with _pil_errors():
        image = _open_pil(data, limits, spec.image_size)
        if _is_plain_uint8(image, spec):
            return _uint8_to_model_input(image, spec)
        pixels = _pil_to_array(image)
    return to_model_input(pixels, spec)


def read_image_bytes(source: bytes | str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an upload or a file; a file over the size limit is refused before it is read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    _check_bytes(path.stat().st_size, limits)
    return path.read_bytes()


def load_for_model(
    source: bytes | str | Path, spec: PreprocessSpec, limits: DecodeLimits = DEFAULT_LIMITS
) -> np.ndarray:
    """Decode and preprocess in one call: the function both evaluation and serving use."""
    return decode_for_model(read_image_bytes(source, limits), spec, limits)


def load_dual_energy_for_model(
    high: bytes | str | Path,
    low: bytes | str | Path,
    spec: PreprocessSpec,
    limits: DecodeLimits = DEFAULT_LIMITS,
) -> np.ndarray:
    """`load_for_model` for a high/low energy pair given as two files."""
    pair = decode_dual_energy(read_image_bytes(high, limits), read_image_bytes(low, limits), limits)
    return to_model_input(pair, spec)
