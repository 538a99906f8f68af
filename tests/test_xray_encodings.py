"""One X-ray image, one tensor: the same content reaches the model alike in every encoding a console writes.

The failure this pins: an 8-bit RGB JPEG of grey content (the most common X-ray export) reached the
X-ray model as a constant image of 1.0, so real baggage scans scored at chance. Each encoding below is
decoded by the serving path (`load_for_model`) and by the training path (`decode_image` then
`to_model_input`) and compared with the 8-bit grey PNG: lossless forms to 1e-6 (a tiny patch enlarged
too: a 32 px patch sent as 16-bit was flagged as unlike training while its 8-bit file was not), JPEG
forms within JPEG's error. Pseudo-colour follows the colour rule of
`inference.preprocess.match_channels`.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import tifffile
from PIL import Image

from verity.datasets.encode import encode_dicom
from verity.inference import colour
from verity.inference.decode import decode_image
from verity.inference.preprocess import (
    GREY_OUTLIER_FRACTION,
    GREY_SPREAD_LEVELS,
    is_grey_content,
    load_for_model,
    match_channels,
    to_model_input,
)
from verity.inference.spec import resolve_spec


def _scan(height: int = 90, width: int = 120) -> np.ndarray:
    """A grey transmission-like image: a bright background, a gradient, a dark slab and a small blob."""
    y, x = np.mgrid[0:height, 0:width]
    image = 200.0 - 80.0 * x / width
    image[20:60, 30:70] -= 90.0
    image[((y - 45) ** 2 + (x - 95) ** 2) < 36] = 15.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _save(array: np.ndarray, fmt: str, mode: str | None = None, **options: object) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _tiff(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    return buffer.getvalue()


GREY = _scan()
LOSSLESS = {
    "8-bit grey PNG": _save(GREY, "PNG"),
    "16-bit grey PNG": _save(GREY.astype(np.uint16) * 257, "PNG"),
    "RGB PNG of grey content": _save(GREY, "PNG", mode="RGB"),
    "8-bit grey TIFF": _tiff(GREY),
    "16-bit grey TIFF": _tiff(GREY.astype(np.uint16) * 257),
    "16-bit DICOS DX": encode_dicom(GREY.astype(np.uint16) * 257),
}
LOSSY = {
    "8-bit grey JPEG": _save(GREY, "JPEG", quality=92),
    "RGB JPEG of grey content": _save(GREY, "JPEG", mode="RGB", quality=92),
    "RGB JPEG of grey content, 4:2:0, q75": _save(GREY, "JPEG", mode="RGB", quality=75, subsampling=2),
}
SPECS = {
    "1 channel, stretch": resolve_spec(
        "xray", override={"image_size": 64, "in_chans": 1, "resize_mode": "stretch"}
    ),
    "3 channels, letterbox": resolve_spec(
        "xray", override={"image_size": 64, "in_chans": 3, "resize_mode": "letterbox"}
    ),
}


def _both_paths(data: bytes, spec) -> np.ndarray:  # noqa: ANN001 - PreprocessSpec
    served = load_for_model(data, spec)
    trained = to_model_input(decode_image(data, draft_size=spec.image_size), spec)
    np.testing.assert_allclose(served, trained, atol=1e-6)
    return served


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("encoding", list(LOSSLESS) + list(LOSSY))
def test_every_encoding_gives_the_tensor_of_the_grey_png(encoding: str, spec_name: str) -> None:
    spec = SPECS[spec_name]
    reference = _both_paths(LOSSLESS["8-bit grey PNG"], spec)
    tensor = _both_paths({**LOSSLESS, **LOSSY}[encoding], spec)
    assert tensor.shape == reference.shape == (spec.in_chans, 64, 64)
    difference = np.abs(tensor - reference)
    if encoding in LOSSLESS:
        # The same numbers whatever the depth: an X-ray's grey plane is resized in float in every form.
        assert difference.max() <= 1e-6
    else:
        assert difference.mean() < 0.01 and difference.max() < 0.1
    # The content survives: never a constant image.
    assert tensor.std() == pytest.approx(reference.std(), rel=0.05)
    assert reference.std() > 0.15


def test_rgb_encoded_grey_is_recognised_and_pseudo_colour_is_not() -> None:
    rgb_jpeg = decode_image(LOSSY["RGB JPEG of grey content, 4:2:0, q75"])
    assert rgb_jpeg.shape[2] == 3 and is_grey_content(rgb_jpeg)
    pseudo = _pseudo_colour()
    assert not is_grey_content(pseudo)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_the_grey_check_decides_as_the_per_pixel_channel_spread_says(
    dtype: type, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The banded elementwise check against the plain definition (max minus min over the channels),
    on images whose share of spread pixels sits just under, at and over the outlier limit, with pixels
    exactly at the allowed spread (grey) in every one of several bands."""
    monkeypatch.setattr(colour, "BAND_PIXELS", 400 * 64)  # 64-row bands: the count crosses bands
    rng = np.random.default_rng(7)
    levels = {np.uint8: 1.0, np.uint16: 257.0, np.float32: 1 / 255}[dtype]
    full = {np.uint8: 255, np.uint16: 65535, np.float32: 1}[dtype]
    jitter = GREY_SPREAD_LEVELS // 2
    height, width = 300, 400  # taller than one band for any width, so several bands are counted
    limit = int(GREY_OUTLIER_FRACTION * height * width)
    for outliers in (limit - 5, limit, limit + 1, limit + 40):
        image = np.repeat(rng.uniform(0.1, 0.9, (height, width, 1)) * full, 3, axis=2)
        image[..., 1] += rng.integers(-jitter, jitter + 1, (height, width)) * levels  # JPEG-like noise
        spots = rng.choice(height * width, outliers + 3 * limit, replace=False)
        flat = image.reshape(-1, 3)
        flat[spots[:outliers], 2] = flat[spots[:outliers], 0] + (GREY_SPREAD_LEVELS + 2) * levels
        ties = spots[outliers:]  # spread exactly the allowed levels (a hair under in float): still grey
        flat[ties, 1] = flat[ties, 0]
        flat[ties, 2] = flat[ties, 0] + (GREY_SPREAD_LEVELS - (0.01 if dtype == np.float32 else 0)) * levels
        image = image.astype(dtype)
        spread = image.max(axis=2).astype(np.float64) - image.min(axis=2).astype(np.float64)
        spread_pixels = np.count_nonzero(spread > GREY_SPREAD_LEVELS * levels)
        expected = spread_pixels <= GREY_OUTLIER_FRACTION * height * width
        assert is_grey_content(image) == expected
        assert expected == (outliers <= limit)


def _pseudo_colour() -> np.ndarray:
    """Organic orange left, metal blue right, white air between, as dual-energy consoles show."""
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    image[5:35, 5:25] = (230, 140, 40)
    image[5:35, 35:55] = (40, 90, 220)
    return image


def test_colour_rule_keeps_hue_for_three_channels_and_takes_luma_for_one() -> None:
    pseudo = _pseudo_colour()
    kept = match_channels(pseudo, SPECS["3 channels, letterbox"])
    np.testing.assert_array_equal(kept, pseudo)  # a 3-channel X-ray model sees the material colours
    luma = match_channels(pseudo, SPECS["1 channel, stretch"])
    expected = np.asarray(Image.fromarray(pseudo).convert("L"))[..., None]
    np.testing.assert_array_equal(luma, expected)  # PIL's own luma: grey content keeps its exact levels
    grey_as_rgb = np.repeat(GREY[..., None], 3, axis=2)
    np.testing.assert_array_equal(match_channels(grey_as_rgb, SPECS["1 channel, stretch"])[..., 0], GREY)
    # For photos nothing collapses: a photo model keeps its three channels as they are.
    photo = resolve_spec("photo", override={"image_size": 64})
    np.testing.assert_array_equal(match_channels(grey_as_rgb, photo), grey_as_rgb)


@pytest.mark.parametrize("size", [(8, 8), (32, 32), (20, 300), (1500, 4000)])
def test_tiny_patches_and_huge_scans_keep_their_content(size: tuple[int, int]) -> None:
    height, width = size
    grey = np.asarray(Image.fromarray(GREY).resize((width, height), Image.Resampling.BILINEAR))
    spec = SPECS["1 channel, stretch"]
    tensor = _both_paths(_save(grey, "JPEG", mode="RGB", quality=90), spec)
    assert tensor.std() > 0.1 and 0.2 < tensor.mean() < 0.8


@pytest.mark.parametrize("spec_name", SPECS)
@pytest.mark.parametrize("side", [32, 7])
def test_a_tiny_patch_enlarged_is_the_same_tensor_in_every_lossless_form(side: int, spec_name: str) -> None:
    """A patch far smaller than the input, enlarged by the resize: resized in uint8, the 8-bit file kept
    a staircase of whole levels that its 16-bit file had not, and the open-set gate's detail rule told
    the two apart."""
    spec = SPECS[spec_name]
    patch = np.asarray(Image.fromarray(GREY).resize((side, side), Image.Resampling.BOX))
    forms = {
        "8-bit grey PNG": _save(patch, "PNG"),
        "RGB PNG of grey content": _save(patch, "PNG", mode="RGB"),
        "16-bit grey PNG": _save(patch.astype(np.uint16) * 257, "PNG"),
        "16-bit grey TIFF": _tiff(patch.astype(np.uint16) * 257),
        "16-bit DICOS DX": encode_dicom(patch.astype(np.uint16) * 257),
    }
    reference = _both_paths(forms.pop("8-bit grey PNG"), spec)
    # Enlarged in float: between two source pixels the values ramp instead of stepping by whole levels.
    levels = reference * 255
    assert np.mean(np.abs(levels - np.round(levels)) > 0.01) > 0.5
    for name, data in forms.items():
        np.testing.assert_allclose(_both_paths(data, spec), reference, atol=1e-6, err_msg=name)
