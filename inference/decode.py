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

Limits (DecodeLimits) are checked from the header and the file's structure before any pixel is decoded,
so a bomb costs nothing; the limits, their checks and the errors are inference/decode_limits.py. No
message quotes a reader's own words (they named heap addresses).
"""

from __future__ import annotations

import contextlib
import io
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image, ImageMode, ImageOps

from verity.inference.colour import finite, flatten, pil_pixels, tiff_samples_to_colour
from verity.inference.decode_limits import (
    DEFAULT_LIMITS,
    DecodeError,
    DecodeLimits,
    UnsupportedFormat,
    check_bytes,
    check_decoded_bytes,
    check_pixels,
    check_segments,
    check_structure,
)
from verity.inference.dicom_intensity import dicom_grey_to_unit

# We check the pixel count ourselves, before decoding, with our own limit and message.
Image.MAX_IMAGE_PIXELS = None

SUPPORTED_FORMATS = "JPEG, PNG, WebP, GIF, BMP, TIFF or DICOM/DICOS"
# The file name suffixes of those formats: for finding image files in a folder, never for trusting a
# file's type (sniff_format reads the content).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".dcm", ".dicom")

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


def content_modality(data: bytes) -> str | None:
    """The modality the bytes themselves decide, as scanner consoles export: DICOM and 16-bit PNG or TIFF
    are X-ray; None for anything else (an 8-bit image may be a photo or an X-ray export: ask)."""
    try:
        kind = sniff_format(data)
    except DecodeError:
        return None  # the decoder says what is wrong when the image is read
    if kind == "dicom":
        return "xray"
    if kind == "png":  # IHDR is the first chunk: its bit depth is byte 24 of the file
        return "xray" if len(data) > 24 and data[24] == 16 else None
    if kind == "tiff":
        try:
            with Image.open(io.BytesIO(data)) as header:  # the header only: no pixels are read
                return "xray" if header.mode.startswith("I;16") else None
        except Exception:  # noqa: BLE001 - an unreadable header is the decoder's to report
            return None
    return None


# DICOM Modality codes (PS3.3 C.7.3.1.1.1) of clinical imaging only: magnetic resonance, ultrasound,
# nuclear medicine and PET, mammography, angiography and fluoroscopy, endoscopy, ophthalmology, dental
# panoramic and intra-oral, slide microscopy, and the radiotherapy, segmentation and report objects.
# Security scanners (DICOS) and industrial radiography write CT, DX, CR or DR, never these, so such a
# file is another kind of image than any X-ray Verity's models learn from, whatever its pixels look like.
CLINICAL_DICOM_MODALITIES = frozenset(
    {"MR", "US", "NM", "PT", "MG", "XA", "RF", "ES", "XC", "GM", "SM", "OP", "OPT", "OCT", "IVOCT",
     "IVUS", "IO", "PX", "BMD", "BDUS", "RTDOSE", "RTIMAGE", "RTPLAN", "RTSTRUCT", "RTRECORD", "SEG",
     "SR", "ECG", "EEG", "EMG", "EPS", "HD"}
)  # fmt: skip


def dicom_modality(data: bytes) -> str | None:
    """The Modality code a DICOM file's header states ("DX", "MR", ...), read without its pixels; None
    for a file that states none or cannot be read (the decoder reports what is wrong with it)."""
    from pydicom import dcmread

    try:
        header = dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["Modality"])
    except Exception:  # noqa: BLE001 - an unreadable header is the decoder's to report
        return None
    code = str(header.get("Modality", "") or "").strip().upper()
    return code or None


# ---------------------------------------------------------------------------------------------- PIL


# Pillow's messages name the file object ("cannot identify image file <_io.BytesIO object at 0x7fd6...>")
# and internals: a client gets fixed wording instead, and the cause stays chained for the log.
_UNREADABLE = "The {name}file could not be read: its header is damaged."
_DAMAGED = "The {name}image could not be decoded: its data is damaged or truncated."
_FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "gif": "GIF", "bmp": "BMP", "webp": "WebP", "tiff": "TIFF"}


@contextlib.contextmanager
def _pil_errors(kind: str | None = None) -> Iterator[None]:
    """Pillow raises OSError, SyntaxError, struct.error... for corrupt files: all become DecodeError."""
    name = f"{_FORMAT_NAMES[kind]} " if kind in _FORMAT_NAMES else ""
    try:
        yield
    except DecodeError:
        raise
    except Image.UnidentifiedImageError as error:
        raise DecodeError(_UNREADABLE.format(name=name)) from error
    except Exception as error:
        raise DecodeError(_DAMAGED.format(name=name)) from error


def pil_to_array(image: Image.Image) -> np.ndarray:
    """A PIL image (from `open_image`) as HxWxC: uint8 for 8-bit modes, uint16 or float32 for deeper ones."""
    with _pil_errors():
        image = flatten(image)
        mode = image.mode
        if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
            return pil_pixels(image, np.uint16)[..., None]
        if mode == "I":
            return np.clip(pil_pixels(image, np.int32), 0, 65535).astype(np.uint16)[..., None]
        if mode == "F":
            return finite(pil_pixels(image, np.float32)[..., None])
        array = pil_pixels(image, np.uint8)
        return array[..., None] if array.ndim == 2 else array


def _pil_decoded_bytes(image: Image.Image) -> int:
    """The bytes of its samples once decoded; a palette counts as the RGBA it may become."""
    if image.mode in ("P", "PA"):
        return image.width * image.height * 4
    mode = ImageMode.getmode(image.mode)
    return image.width * image.height * len(mode.bands) * np.dtype(mode.typestr).itemsize


def _open_pil(data: bytes, limits: DecodeLimits, draft_size: int | None) -> Image.Image:
    """The decoded, upright PIL image, flattened (`colour.flatten`); `pil_to_array` makes it HxWxC."""
    image = Image.open(io.BytesIO(data))
    check_pixels(image.width, image.height, limits)
    check_decoded_bytes(_pil_decoded_bytes(image), limits)
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
    _apply_exif_orientation(image)  # before flattening: the flattened copy has no EXIF
    # Flattened here, so the caller holds one image: a huge RGBA one is dropped once composited.
    return flatten(image)


def _decode_pil(data: bytes, kind: str, limits: DecodeLimits, draft_size: int | None) -> np.ndarray:
    with _pil_errors(kind):
        return pil_to_array(_open_pil(data, limits, draft_size))


def _apply_exif_orientation(image: Image.Image) -> None:
    """Turns the pixels upright per EXIF; a damaged EXIF block is ignored rather than losing the photo."""
    with contextlib.suppress(Exception):  # any EXIF parsing failure means "orientation unknown"
        ImageOps.exif_transpose(image, in_place=True)


# --------------------------------------------------------------------------------------------- TIFF


def _to_supported_dtype(array: np.ndarray) -> np.ndarray:
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * np.uint8(255)
    if np.issubdtype(array.dtype, np.floating):
        return finite(array.astype(np.float32))
    if np.issubdtype(array.dtype, np.integer):
        return np.clip(array, 0, 65535).astype(np.uint16)
    raise UnsupportedFormat(f"TIFF sample type {array.dtype} is not supported.")


def _tiff_page_array(page) -> np.ndarray:  # noqa: ANN001 - tifffile.TiffPage
    """One TIFF page as HxWxC in the photometric meaning of its samples."""
    array = page.asarray()
    if page.samplesperpixel > 1 and page.planarconfig == 2:  # separate planes: SYX -> YXS
        array = np.moveaxis(array, 0, -1)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise UnsupportedFormat(f"TIFF pages of shape {array.shape} (volumes) are not supported.")
    extrasamples = tuple(int(x) for x in (page.extrasamples or ()))
    has_alpha = bool(extrasamples) and extrasamples[0] in (1, 2)
    colormap = page.colormap if int(page.photometric) == 3 else None
    return tiff_samples_to_colour(array, int(page.photometric), has_alpha, colormap)


def _tiff_decoded_bytes(page) -> int:  # noqa: ANN001 - tifffile.TiffPage
    itemsize = page.dtype.itemsize if page.dtype is not None else max(1, -(-int(page.bitspersample) // 8))
    samples = int(page.imagewidth) * int(page.imagelength) * int(page.imagedepth) * int(page.samplesperpixel)
    return samples * itemsize


def _tiff_pages_to_read(tiff, limits: DecodeLimits) -> list:  # noqa: ANN001 - tifffile.TiffFile
    first = tiff.pages[0]
    pages = [first]
    second = None
    if first.samplesperpixel == 1:
        # pages[1], never len(pages): counting the pages walks every IFD of the chain, 1M empty ones too.
        with contextlib.suppress(IndexError):
            second = tiff.pages[1]
    # Two full-size single-sample pages: a dual-energy high/low pair. A smaller second page is a
    # thumbnail or a pyramid level and is ignored.
    if second is not None and getattr(second, "shape", None) == first.shape and second.samplesperpixel == 1:
        pages.append(second)
    for page in pages:
        check_pixels(int(page.imagewidth), int(page.imagelength), limits)
        if int(page.imagedepth) > 1:  # ImageDepth 64 was once scored as a 64 x width image
            raise UnsupportedFormat(f"TIFF volumes ({int(page.imagedepth)} depth slices) are not supported.")
    check_decoded_bytes(sum(_tiff_decoded_bytes(page) for page in pages), limits)
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
            return _decode_pil(data, "tiff", limits, None)
        raise DecodeError(_DAMAGED.format(name="TIFF ")) from error
    array = planes[0] if len(planes) == 1 else np.concatenate(planes, axis=2)
    return _to_supported_dtype(array)


# -------------------------------------------------------------------------------------------- DICOM


def _count_elements(limits: DecodeLimits) -> Callable[[object, object, int], bool]:
    """pydicom's `stop_when` hook, called once per top-level element: refuses an element flood (2M empty
    elements in 16 MB took 6.4 s to parse) and never stops a file within the limit."""
    counter = itertools.count(1)

    def stop_when(tag: object, vr: object, length: int) -> bool:
        check_segments(next(counter), limits)
        return False

    return stop_when


def _dicom_decoded_bytes(dataset) -> int:  # noqa: ANN001 - pydicom.Dataset
    """Colour as stored; grey as what it decodes to, float32 windowed to [0, 1] (`_decode_dicom`)."""

    def number(name: str, default: int) -> int:
        return int(dataset.get(name, default) or default)

    pixels = number("Rows", 0) * number("Columns", 0) * number("NumberOfFrames", 1)
    if number("SamplesPerPixel", 1) > 1:
        return pixels * number("SamplesPerPixel", 1) * max(1, -(-number("BitsAllocated", 8) // 8))
    return pixels * 4


def _read_dicom(data: bytes, limits: DecodeLimits):  # noqa: ANN202 - (dataset, pixels)
    from pydicom.filereader import read_partial  # dcmread without a hook: the same reader

    try:
        dataset = read_partial(io.BytesIO(data), stop_when=_count_elements(limits))
    except DecodeError:
        raise
    except Exception as error:
        raise DecodeError("The DICOM object could not be read: its structure is damaged.") from error
    if not any(name in dataset for name in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise DecodeError("The DICOM object holds no image (no Pixel Data element).")
    check_pixels(int(dataset.get("Columns", 0) or 0), int(dataset.get("Rows", 0) or 0), limits)
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 2:
        raise UnsupportedFormat(
            f"The DICOM object has {frames} frames; only single images and dual-energy pairs (2 frames) "
            "are supported."
        )
    check_decoded_bytes(_dicom_decoded_bytes(dataset), limits)
    try:
        pixels = dataset.pixel_array
    except (NotImplementedError, RuntimeError, ImportError) as error:
        syntax = dataset.file_meta.get("TransferSyntaxUID")
        # The UID's registered name; an unregistered one is the file's own text, never echoed.
        name = syntax.name if getattr(syntax, "is_transfer_syntax", False) else "of this file"
        raise UnsupportedFormat(f"The DICOM transfer syntax {name} cannot be decoded here.") from error
    except Exception as error:
        raise DecodeError("The DICOM pixel data could not be decoded: it is damaged or truncated.") from error
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
        raise DecodeError("The DICOM rescale or window elements are damaged.") from error
    if frames == 2:
        return np.ascontiguousarray(np.moveaxis(unit, 0, -1))  # frames: high energy, low energy
    return unit[..., None]


# ------------------------------------------------------------------------------------------- public


def open_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None, kind: str | None = None
) -> Image.Image | np.ndarray:
    """`decode_image`, stopping short of the array for formats Pillow reads: TIFF and DICOM (their own
    readers) come back as the HxWxC array, everything else as the loaded, upright PIL image (flattened to
    "L", "RGB" or a deep grey mode), so a caller that resizes an 8-bit image can do so in PIL, its fast
    path (`preprocess.load_for_model`). `kind` is the format `sniff_format` named, when the caller has it.
    """
    check_bytes(len(data), limits)
    kind = kind or sniff_format(data)
    if kind == "tiff":
        return _decode_tiff(data, limits)
    if kind == "dicom":
        return _decode_dicom(data, limits)
    check_structure(data, kind, limits)
    with _pil_errors(kind):
        return _open_pil(data, limits, draft_size)


def decode_image(
    data: bytes, limits: DecodeLimits = DEFAULT_LIMITS, draft_size: int | None = None, kind: str | None = None
) -> np.ndarray:
    """Decodes image bytes to an HxWxC array (uint8, uint16 or float32), orientation applied.

    C is 1 (grey), 2 (dual-energy high/low) or 3 (RGB; alpha is composited onto white). `draft_size`
    lets a JPEG be decoded at reduced scale when the model needs far fewer pixels. Raises DecodeError
    (or a subclass) with a message fit to show a user.
    """
    decoded = open_image(data, limits, draft_size, kind)
    return pil_to_array(decoded) if isinstance(decoded, Image.Image) else decoded


def read_image_bytes(source: bytes | str | Path, limits: DecodeLimits = DEFAULT_LIMITS) -> bytes:
    """The bytes of an upload or a file; a file over the size limit is refused before it is read."""
    if isinstance(source, bytes | bytearray | memoryview):
        return bytes(source)
    path = Path(source)
    check_bytes(path.stat().st_size, limits)
    return path.read_bytes()


def image_files_under(folder: Path) -> list[Path]:
    """Every file under `folder` (recursively) whose suffix is an image's, sorted."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
