"""Colour conversions of decoded pixels: PIL modes flattened to the ones we keep (alpha onto white, CMYK
ink and palettes to RGB), TIFF samples by their photometric meaning, non-finite floats to 0, and PIL
images to arrays. `inference/decode.py` applies them to what its readers give.

The conversions that need working copies run over bands of rows, so a large image costs its own size
and one band, not several copies of itself (a 6320x6320 RGBA PNG took RSS from 235 to 1,132 MB when
its conversions worked on the whole image). Every conversion is per pixel, so the bands give exactly
the numbers of the whole image.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from PIL import Image

# Pixels per band of rows: a few MB of float32 working copies, whatever the image's size.
BAND_PIXELS = 1 << 20


def band_rows(width: int) -> int:
    """Rows per band of an image `width` pixels wide."""
    return max(1, BAND_PIXELS // max(1, width))


def _composite_on_white(image: Image.Image, mode: str) -> Image.Image:
    """A PIL image with alpha (RGBA, LA, PA, P with transparency...) composited onto white, as a label
    printed on paper would look, as a `mode` ("L" or "RGB") image."""
    out = Image.new(mode, image.size)
    step = band_rows(image.width)
    for top in range(0, image.height, step):
        box = (0, top, image.width, min(image.height, top + step))
        band = image.crop(box).convert("RGBA")
        white = Image.new("RGBA", band.size, (255, 255, 255, 255))
        out.paste(Image.alpha_composite(white, band).convert(mode), box[:2])
    return out


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


def flatten(image: Image.Image) -> Image.Image:
    """A PIL image in the modes we keep: "L" and "RGB" for 8-bit images (alpha composited onto white, CMYK
    and palettes converted), the deep grey modes ("I;16", "I", "F") as they are."""
    mode = image.mode
    if mode in ("L", "RGB", "I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return image
    if mode in ("LA", "La"):
        return _composite_on_white(image, "L")
    if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image, "RGB")
    if mode == "CMYK":
        return _cmyk_to_rgb(image)
    if mode == "1":
        return image.convert("L")
    return image.convert("RGB")  # P, YCbCr, LAB, HSV, RGBX


def pil_pixels(image: Image.Image, dtype: type) -> np.ndarray:
    """np.asarray(image, dtype), band by band: Pillow's own export joins chunks of a full copy into a
    second one (two 120 MB copies of a 40 MP RGB image at once)."""
    step = band_rows(image.width)
    out: np.ndarray | None = None
    for top in range(0, image.height, step):
        band: np.ndarray = np.asarray(image.crop((0, top, image.width, min(image.height, top + step))), dtype)
        if out is None:
            out = np.empty((image.height, *band.shape[1:]), band.dtype)
        out[top : top + band.shape[0]] = band
    assert out is not None  # an image has at least one row (`check_pixels`)
    return out


def finite(array: np.ndarray) -> np.ndarray:
    """NaN and infinities (seen in float scans with dead pixels) would poison every later step."""
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        return np.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0)
    return array


def _invert(array: np.ndarray) -> np.ndarray:
    if np.issubdtype(array.dtype, np.integer):
        return np.iinfo(array.dtype).max - array
    return 1.0 - array


def _full_scale(dtype: np.dtype) -> float:
    return float(np.iinfo(dtype).max) if np.issubdtype(dtype, np.integer) else 1.0


def by_bands(
    convert: Callable[[np.ndarray], np.ndarray], array: np.ndarray, channels: int, dtype: np.dtype
) -> np.ndarray:
    """`convert` applied to each band of rows of an HxWxC array, into one HxWx`channels` array."""
    out = np.empty((*array.shape[:2], channels), dtype)
    step = band_rows(array.shape[1])
    for top in range(0, array.shape[0], step):
        out[top : top + step] = convert(array[top : top + step])
    return out


def _separated_to_rgb(array: np.ndarray) -> np.ndarray:
    """CMYK ink coverage to RGB: R = (1 - C)(1 - K), the same formula PIL uses without a profile."""
    full = _full_scale(array.dtype)

    def convert(band: np.ndarray) -> np.ndarray:
        ink = band[..., :4].astype(np.float32) / full
        rgb = (1.0 - ink[..., :3]) * (1.0 - ink[..., 3:4])
        if array.dtype == np.uint8:
            return np.round(rgb * 255.0).astype(np.uint8)
        if array.dtype == np.uint16:
            return np.round(rgb * 65535.0).astype(np.uint16)
        return rgb.astype(np.float32)

    kept = array.dtype if array.dtype in (np.uint8, np.uint16) else np.dtype(np.float32)
    return by_bands(convert, array, 3, kept)


def _alpha_onto_white(array: np.ndarray, colour_samples: int) -> np.ndarray:
    """Composites the alpha sample after `colour_samples` colour samples onto white, as
    `_composite_on_white` does for PIL images."""
    full = _full_scale(array.dtype)
    integer = np.issubdtype(array.dtype, np.integer)

    def convert(band: np.ndarray) -> np.ndarray:
        colour = band[..., :colour_samples].astype(np.float32)
        alpha = band[..., colour_samples : colour_samples + 1].astype(np.float32) / full
        out = colour * alpha + full * (1.0 - alpha)
        return np.round(out).astype(array.dtype) if integer else out

    return by_bands(convert, array, colour_samples, array.dtype if integer else np.dtype(np.float32))


_TIFF_PHOTOMETRIC = {0: "miniswhite", 1: "minisblack", 2: "rgb", 3: "palette", 5: "separated"}


def _first_samples(array: np.ndarray, count: int) -> np.ndarray:
    """The first `count` samples, copied when others are dropped, so the rest is freed at once."""
    return array if array.shape[2] == count else np.ascontiguousarray(array[..., :count])


def tiff_samples_to_colour(
    array: np.ndarray, photometric: int, has_alpha: bool, colormap: np.ndarray | None
) -> np.ndarray:
    """A TIFF page's HxWxS samples as our HxWxC pixels, by its photometric interpretation: palette and
    CMYK to RGB, alpha onto white, min-is-white inverted. Two grey samples with no alpha meaning are a
    dual-energy high/low pair; of more, the first is kept."""
    meaning = _TIFF_PHOTOMETRIC.get(photometric)
    if meaning == "palette":
        if colormap is None:
            raise ValueError("A palette TIFF page without a colour map.")
        # One 8-bit RGB entry per index (the map is 3 x 2**bits 16-bit entries), then one lookup: no
        # 16-bit copy of the whole image.
        table = ((colormap >> 8) if colormap.max() > 255 else colormap).astype(np.uint8).T
        return table[array[..., 0]]
    if meaning == "separated":
        return _separated_to_rgb(array)
    if meaning == "rgb":
        return _alpha_onto_white(array, 3) if has_alpha and array.shape[2] >= 4 else _first_samples(array, 3)
    if meaning == "miniswhite":
        array = _invert(array)
    if array.shape[2] == 2 and has_alpha:
        return _alpha_onto_white(array, 1)
    return array if array.shape[2] <= 2 else _first_samples(array, 1)
