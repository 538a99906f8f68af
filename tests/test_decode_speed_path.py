"""The fast decode path (`load_for_model`) gives the same numbers as the general one.

Serving and evaluation use `load_for_model`; training uses `decode_image` + augmentation +
`to_model_input`. These tests pin the two together value for value, and pin the 8-bit path to the
plain formula (PIL resize in uint8, then float32 / 255), so the shortcut cannot drift.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from verity.inference.decode import decode_image
from verity.inference.decode_limits import DecodeError, DecodeLimits, ImageTooLarge
from verity.inference.preprocess import load_for_model, to_model_input
from verity.inference.spec import default_spec, resolve_spec


def _photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 / width, y * 255 / height, (x + y) * 127 / (width + height)], axis=2)
    return np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)


def _encode(array: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _rotated_jpeg() -> bytes:
    image = Image.fromarray(_photo(300, 500))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


def _tiff16() -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, (_photo(120, 200)[..., 0].astype(np.uint16) * 257))
    return buffer.getvalue()


PHOTO = default_spec("photo")
XRAY = default_spec("xray")
CASES = {
    "large RGB JPEG (draft decode)": (_encode(_photo(768, 1024), "JPEG", quality=90), PHOTO),
    "RGB JPEG into a letterboxed grey model": (_encode(_photo(600, 800), "JPEG"), XRAY),
    "grey JPEG, X-ray letterbox": (_encode(_photo(500, 900)[..., 0], "JPEG"), XRAY),
    "grey JPEG into a colour model": (_encode(_photo(400, 300)[..., 1], "JPEG"), PHOTO),
    "EXIF-rotated JPEG": (_rotated_jpeg(), PHOTO),
    "RGB PNG, bicubic letterbox": (
        _encode(_photo(90, 130), "PNG"),
        resolve_spec("photo", override={"resize_mode": "letterbox", "interpolation": "bicubic"}),
    ),
    "RGBA PNG": (_encode(np.dstack([_photo(64, 64), np.full((64, 64), 128, np.uint8)]), "PNG"), PHOTO),
    "16-bit grey PNG": (_encode(_photo(100, 160)[..., 0].astype(np.uint16) * 257, "PNG"), XRAY),
    "16-bit TIFF": (_tiff16(), XRAY),
    "image already at model size": (_encode(_photo(224, 224), "PNG"), PHOTO),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_path_equals_general_path(name: str, tmp_path: Path) -> None:
    data, spec = CASES[name]
    general = to_model_input(decode_image(data, draft_size=spec.image_size), spec)
    fast = load_for_model(data, spec)
    assert fast.dtype == np.float32 and fast.flags.c_contiguous
    assert fast.shape == (spec.in_chans, spec.image_size, spec.image_size)
    np.testing.assert_array_equal(fast, general)
    (tmp_path / "image").write_bytes(data)
    np.testing.assert_array_equal(load_for_model(tmp_path / "image", spec), general)


def test_uint8_path_is_pil_resize_then_divide_by_255() -> None:
    data = _encode(_photo(192, 256), "PNG")
    expected = np.asarray(Image.open(io.BytesIO(data)).resize((224, 224), Image.Resampling.BILINEAR))
    expected = expected.astype(np.float32).transpose(2, 0, 1) / 255.0
    np.testing.assert_array_equal(load_for_model(data, PHOTO), expected)


def test_letterbox_pads_x_ray_with_air_and_photos_with_black() -> None:
    wide = _encode(_photo(100, 200)[..., 0], "PNG")
    xray = load_for_model(wide, XRAY)
    assert np.all(xray[:, :56] == 1.0) and np.all(xray[:, -56:] == 1.0)  # 224 - 112 rows of air
    photo_spec = resolve_spec("photo", override={"resize_mode": "letterbox"})
    photo = load_for_model(_encode(_photo(100, 200), "PNG"), photo_spec)
    assert np.all(photo[:, :56] == 0.0) and photo[:, 56:-56].max() > 0.5


def test_fast_path_keeps_the_errors_and_limits() -> None:
    with pytest.raises(DecodeError, match="could not be decoded"):
        load_for_model(_encode(_photo(300, 300), "JPEG")[:400], PHOTO)
    with pytest.raises(ImageTooLarge):
        load_for_model(_encode(_photo(300, 300), "PNG"), PHOTO, DecodeLimits(max_pixels=1000))
    with pytest.raises(ImageTooLarge):
        load_for_model(b"\xff\xd8\xff" + b"0" * 2000, PHOTO, DecodeLimits(max_bytes=1000))
