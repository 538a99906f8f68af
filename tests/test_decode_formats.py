"""Every format the decoder promises, each file made inside the test; the limits; dual energy."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from verity.datasets.encode import encode_dicom as _dicom
from verity.inference.decode import decode_image
from verity.inference.decode_limits import (
    DecodeError,
    DecodeLimits,
    ImageTooLarge,
    UnsupportedFormat,
)
from verity.inference.dual_energy import decode_dual_energy
from verity.inference.preprocess import load_for_model, to_model_input
from verity.inference.spec import default_spec, resolve_spec


def _gradient(height: int = 40, width: int = 56) -> np.ndarray:
    """An RGB image whose every pixel differs from its neighbours, so orientation mistakes show."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 6 % 256, (x + y) * 2 % 256], axis=2).astype(np.uint8)


def _save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: bytes = b"") -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


# ---------------------------------------------------------------------------------- JPEG / PNG / ...


def test_jpeg_exif_orientation_is_applied():
    pixels = _gradient()
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: the viewer must turn it 90 degrees clockwise
    data = _save(Image.fromarray(pixels), "JPEG", quality=95, exif=exif)
    decoded = decode_image(data)
    assert decoded.shape == (56, 40, 3)
    expected = np.rot90(pixels, k=-1)
    assert np.abs(decoded.astype(int) - expected.astype(int)).mean() < 6


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
def test_jpeg_with_damaged_exif_still_decodes():
    damaged = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12\x00\x03\xff\xff\xff\xff"
    data = _save(Image.new("RGB", (20, 10), (10, 200, 30)), "JPEG", quality=95, exif=damaged)
    assert decode_image(data).shape == (10, 20, 3)


def test_jpeg_draft_decodes_reduced_but_large_enough():
    data = _save(Image.fromarray(_gradient(480, 640)), "JPEG", quality=90)
    assert decode_image(data).shape == (480, 640, 3)
    drafted = decode_image(data, draft_size=224)
    assert drafted.shape == (240, 320, 3)  # 1/2 scale: 1/4 would fall under 224
    assert load_for_model(data, default_spec("photo")).shape == (3, 224, 224)


def test_cmyk_jpeg_and_tiff_become_rgb():
    cmyk = Image.new("CMYK", (32, 24), (0, 255, 255, 0))  # pure red ink mix
    for data in (_save(cmyk, "JPEG", quality=95), _save(cmyk, "TIFF")):
        decoded = decode_image(data)
        assert decoded.shape == (24, 32, 3) and decoded.dtype == np.uint8
        red, green, blue = decoded[12, 16].astype(int)
        assert red > 200 and green < 60 and blue < 60


def test_cmyk_tiff_written_by_tifffile():
    import tifffile

    ink = np.zeros((16, 20, 4), np.uint8)
    ink[..., 3] = 128  # half black
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, ink, photometric="separated")
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (16, 20, 3)
    assert np.all(np.abs(decoded.astype(int) - 127) <= 1)


def test_png_8bit_16bit_palette_and_alpha():
    pixels = _gradient()
    assert np.array_equal(decode_image(_save(Image.fromarray(pixels), "PNG")), pixels)

    deep = (np.arange(40 * 56).reshape(40, 56) * 29).astype(np.uint16)
    decoded = decode_image(_save(Image.fromarray(deep), "PNG"))
    assert decoded.dtype == np.uint16 and np.array_equal(decoded[..., 0], deep)

    palette = Image.fromarray(pixels).quantize(colors=16)
    decoded = decode_image(_save(palette, "PNG"))
    assert decoded.shape == (40, 56, 3)
    assert np.array_equal(decoded, np.asarray(palette.convert("RGB")))

    rgba = np.dstack([pixels, np.zeros((40, 56), np.uint8)])
    rgba[:20, :, 3] = 255
    decoded = decode_image(_save(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert np.array_equal(decoded[:20], pixels[:20])
    assert np.all(decoded[20:] == 255)  # transparent -> white background

    grey_alpha = Image.fromarray(np.dstack([deep.astype(np.uint8), np.full((40, 56), 255, np.uint8)]), "LA")
    assert decode_image(_save(grey_alpha, "PNG")).shape == (40, 56, 1)


def test_png_16bit_rgb_is_read():
    deep = (_gradient(8, 10).astype(np.uint16) * 257).astype(">u2")
    rows = b"".join(b"\x00" + deep[y].tobytes() for y in range(8))
    decoded = decode_image(_raw_png(10, 8, 16, 2, rows))
    assert decoded.shape == (8, 10, 3)
    assert np.array_equal(decoded, _gradient(8, 10))  # 16-bit RGB is reduced to 8 bits per channel


def test_webp_lossless_and_gif_first_frame():
    pixels = _gradient()
    assert np.array_equal(decode_image(_save(Image.fromarray(pixels), "WEBP", lossless=True)), pixels)

    first = Image.new("RGB", (20, 16), (255, 0, 0))
    second = Image.new("RGB", (20, 16), (0, 0, 255))
    gif = _save(first, "GIF", save_all=True, append_images=[second], duration=100, loop=0)
    decoded = decode_image(gif)
    assert decoded.shape == (16, 20, 3)
    assert tuple(decoded[8, 10]) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ TIFF


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.float32])
def test_tiff_grey_depths(dtype):
    import tifffile

    values = np.linspace(0, 1 if dtype == np.float32 else np.iinfo(dtype).max, 24 * 32).reshape(24, 32)
    array = values.astype(dtype)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array)
    decoded = decode_image(buffer.getvalue())
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == (24, 32, 1)
    assert np.array_equal(decoded[..., 0], array)
    model_input = to_model_input(decoded, default_spec("xray"))
    assert model_input.shape == (1, 224, 224) and model_input.min() >= 0.0 and model_input.max() <= 1.0


def test_tiff_16bit_rgb_and_float_nan():
    import tifffile

    rgb = (np.arange(8 * 8 * 3).reshape(8, 8, 3) * 300).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb, photometric="rgb")
    assert np.array_equal(decode_image(buffer.getvalue()), rgb)

    scan = np.full((8, 8), 0.5, np.float32)
    scan[0, 0] = np.nan
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, scan)
    decoded = decode_image(buffer.getvalue())
    assert np.isfinite(decoded).all() and decoded[0, 0, 0] == 0.0


def test_big_endian_tiff_and_rle_dicom():
    import tifffile
    from pydicom.uid import RLELossless

    values = (np.arange(64).reshape(8, 8) * 1000).astype(np.uint16)
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, values, byteorder=">")
    decoded = decode_image(buffer.getvalue())
    assert decoded.dtype == np.uint16 and np.array_equal(decoded[..., 0], values)
    assert decode_image(_dicom(values, transfer_syntax=RLELossless))[..., 0] == pytest.approx(values / 65535)


def test_lzw_tiff_falls_back_to_pillow():
    pixels = _gradient()
    decoded = decode_image(_save(Image.fromarray(pixels), "TIFF", compression="tiff_lzw"))
    assert np.array_equal(decoded, pixels)


def test_dual_energy_two_page_and_two_sample_tiff():
    import tifffile

    high = np.full((20, 30), 40000, np.uint16)
    low = np.full((20, 30), 9000, np.uint16)
    buffer = io.BytesIO()
    with tifffile.TiffWriter(buffer) as writer:
        writer.write(high)
        writer.write(low)
    decoded = decode_image(buffer.getvalue())
    assert decoded.shape == (20, 30, 2)
    assert decoded[0, 0, 0] == 40000 and decoded[0, 0, 1] == 9000

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.stack([high, low], axis=2), photometric="minisblack", planarconfig="contig")
    assert np.array_equal(decode_image(buffer.getvalue()), decoded)

    dual_spec = resolve_spec("xray", override={"in_chans": 2})
    model_input = to_model_input(decoded, dual_spec)
    assert model_input.shape == (2, 224, 224)
    # letterboxed: the image rows hold the two energies, the padding is air (1.0)
    assert model_input[0, 112, 112] == pytest.approx(40000 / 65535, abs=1e-4)
    assert model_input[1, 112, 112] == pytest.approx(9000 / 65535, abs=1e-4)
    assert model_input[0, 0, 0] == 1.0
    # a single-energy model sees the high-energy image
    single = to_model_input(decoded, default_spec("xray"))
    assert single[0, 112, 112] == pytest.approx(40000 / 65535, abs=1e-4)


def test_dual_energy_pair_of_files(tmp_path):
    high = _save(Image.fromarray(np.full((12, 16), 30000, np.uint16)), "PNG")
    low = _save(Image.fromarray(np.full((12, 16), 5000, np.uint16)), "PNG")
    pair = decode_dual_energy(high, low)
    assert pair.shape == (12, 16, 2) and pair.dtype == np.uint16
    assert tuple(pair[0, 0]) == (30000, 5000)
    (tmp_path / "high.png").write_bytes(high)
    (tmp_path / "low.png").write_bytes(low)
    spec = resolve_spec("xray", override={"in_chans": 2})
    model_input = to_model_input(decode_dual_energy(tmp_path / "high.png", tmp_path / "low.png"), spec)
    assert model_input.shape == (2, 224, 224)
    assert model_input[:, 112, 112] == pytest.approx((30000 / 65535, 5000 / 65535), abs=1e-4)

    other_size = _save(Image.fromarray(np.zeros((13, 16), np.uint16)), "PNG")
    with pytest.raises(DecodeError, match="differ in size"):
        decode_dual_energy(high, other_size)
    colour = _save(Image.fromarray(_gradient(12, 16)), "PNG")
    with pytest.raises(DecodeError, match="single grey channel"):
        decode_dual_energy(high, colour)
    # mixed depths become float32 in [0, 1]
    mixed = decode_dual_energy(high, _save(Image.fromarray(np.full((12, 16), 51, np.uint8)), "PNG"))
    assert mixed.dtype == np.float32 and mixed[0, 0, 1] == pytest.approx(0.2)


# ----------------------------------------------------------------------------------------------- DICOM


def test_dicos_dx_rescale_and_window():
    stored = np.array([[100, 200], [300, 400]], np.uint16)
    # rescale: value = 2 * stored - 100 -> 100, 300, 500, 700; window 400 +- 200 (LINEAR_EXACT)
    data = _dicom(
        stored,
        RescaleSlope=2,
        RescaleIntercept=-100,
        WindowCenter=400,
        WindowWidth=400,
        VOILUTFunction="LINEAR_EXACT",
    )
    decoded = decode_image(data)
    assert decoded.dtype == np.float32 and decoded.shape == (2, 2, 1)
    assert decoded[..., 0] == pytest.approx(np.array([[0.0, 0.25], [0.75, 1.0]]), abs=1e-6)


def test_dicom_monochrome1_is_inverted_and_no_window_uses_the_stored_range():
    stored = np.array([[0, 4095], [1024, 2048]], np.uint16)
    plain = decode_image(_dicom(stored, sop_class="1.2.840.10008.5.1.4.1.1.1.1", BitsStored=12, HighBit=11))
    assert plain[..., 0] == pytest.approx(stored / 4095.0, abs=1e-6)
    monochrome1 = _dicom(stored, BitsStored=12, HighBit=11, PhotometricInterpretation="MONOCHROME1")
    inverted = decode_image(monochrome1)
    assert inverted[..., 0] == pytest.approx(1.0 - stored / 4095.0, abs=1e-6)


def test_two_frame_dicom_is_dual_energy():
    frames = np.stack([np.full((4, 6), 60000), np.full((4, 6), 6000)]).astype(np.uint16)
    decoded = decode_image(_dicom(frames))
    assert decoded.shape == (4, 6, 2)
    assert decoded[0, 0, 0] == pytest.approx(60000 / 65535)
    assert decoded[0, 0, 1] == pytest.approx(6000 / 65535)
    with pytest.raises(UnsupportedFormat, match="3 frames"):
        decode_image(_dicom(np.zeros((3, 4, 6), np.uint16)))


# ---------------------------------------------------------------------------------------------- limits


def test_decompression_bomb_refused_before_decoding():
    # The header declares 100000 x 100000 pixels; the body is a few bytes, so decoding would fail
    # differently (truncated data) if the size were not refused first.
    bomb = _raw_png(100_000, 100_000, 8, 0, b"\x00" * 10)
    with pytest.raises(ImageTooLarge, match="100000x100000"):
        decode_image(bomb)
    small_limit = DecodeLimits(max_pixels=1000)
    with pytest.raises(ImageTooLarge):
        decode_image(_save(Image.fromarray(_gradient()), "JPEG"), small_limit)
    with pytest.raises(ImageTooLarge):
        decode_image(_dicom(np.zeros((40, 40), np.uint16)), small_limit)
    import tifffile

    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.zeros((40, 40), np.uint8))
    with pytest.raises(ImageTooLarge):
        decode_image(buffer.getvalue(), small_limit)


def test_file_size_limit(tmp_path):
    data = _save(Image.fromarray(_gradient()), "PNG")
    limits = DecodeLimits(max_bytes=len(data) - 1)
    with pytest.raises(ImageTooLarge, match="bytes"):
        decode_image(data, limits)
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(ImageTooLarge):
        load_for_model(path, default_spec("photo"), limits)


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"", DecodeError),
        (b"hello, not an image at all", UnsupportedFormat),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00", UnsupportedFormat),
        (b"\xff\xd8\xff\xe0" + b"\x00" * 20, DecodeError),
        (b"II*\x00" + b"\x00" * 20, DecodeError),
        (b"\x00" * 128 + b"DICM" + b"\x00" * 20, DecodeError),
    ],
)
def test_bad_bytes_raise_decode_errors(data, error):
    with pytest.raises(error) as raised:
        decode_image(data)
    assert isinstance(raised.value, DecodeError) and raised.value.code
