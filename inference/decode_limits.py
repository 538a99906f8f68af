"""What an image file may cost before it is decoded, and the errors decoding raises.

DecodeLimits bounds the file's bytes, its pixels, the bytes its decoded samples take, the scans of a
progressive JPEG and the parts a reader parses one by one; each `check_*` refuses a file beyond one of
them from its header or structure (inference/image_structure.py), before any pixel is decoded, so a bomb
costs nothing. Each refusal is its own DecodeError subclass with its own code, and no message quotes a
reader's own words. The readers themselves are inference/decode.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from verity.inference.image_structure import count_gif_blocks, count_jpeg_parts, count_png_chunks


class DecodeError(ValueError):
    """The bytes are not an image we can read. `code` is a short machine-readable reason."""

    code = "undecodable_image"


class UnsupportedFormat(DecodeError):
    """A container or encoding we do not read (HTTP 415)."""

    code = "unsupported_media_type"


class ImageTooLarge(DecodeError):
    """The file or its declared pixel count exceeds the limits (HTTP 413). Each subclass is one more
    limit, with its own code, so a client is told which one it hit."""

    code = "image_too_large"

    def __init__(self, message: str, limit_bytes: int | None = None) -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes  # set when the limit is in bytes (file size, decoded samples)


class DecodedTooLarge(ImageTooLarge):
    """The decoded samples (width x height x depth x samples x bytes per sample) exceed the limit."""

    code = "decoded_too_large"


class TooManyScans(ImageTooLarge):
    """A progressive JPEG declares more scans than the limit."""

    code = "too_many_jpeg_scans"


class TooManySegments(ImageTooLarge):
    """A file holds more parts (JPEG segments, PNG chunks, GIF blocks, DICOM elements) than the limit."""

    code = "too_many_segments"


@dataclass(frozen=True)
class DecodeLimits:
    max_bytes: int = 64 * 1024 * 1024
    # 6000x4000 phone photos and 4096-px scans pass; a decompression bomb does not.
    max_pixels: int = 40_000_000
    # What the decoded samples may take (width x height x depth x samples x bytes per sample), read from
    # the header: pixels alone let a 280 KB TIFF of 2000x2000 x 64 samples decode to 256 MB. Pillow holds
    # 8-bit RGB in 4 bytes a pixel, so an RGB array costs about 2.3 times this at its peak: the default
    # keeps that under 300 MB (33 MP of RGB, 25 MP of RGBA or of 16-bit dual energy).
    max_decoded_bytes: int = 96 * 1024 * 1024
    # libjpeg decodes a progressive JPEG's whole image once per scan (up to 20 ms a scan at 36 MP here);
    # encoders write at most about 10-20. 5,000 empty scans in 551 KB took 10-100 s.
    max_jpeg_scans: int = 32
    # Parts one file may hold (JPEG marker segments, PNG chunks, GIF blocks, top-level DICOM elements),
    # each parsed in Python: 20 MB of empty ones took 2-9 s. Real files hold tens to a few thousand.
    max_image_segments: int = 50_000


DEFAULT_LIMITS = DecodeLimits()


def check_pixels(width: int, height: int, limits: DecodeLimits) -> None:
    if width <= 0 or height <= 0:
        raise DecodeError(f"The image declares an empty size {width}x{height}.")
    if width * height > limits.max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} = {width * height:,} pixels; the limit is {limits.max_pixels:,}."
        )


def check_bytes(size: int, limits: DecodeLimits) -> None:
    if size > limits.max_bytes:
        raise ImageTooLarge(
            f"The file is {size:,} bytes; the limit is {limits.max_bytes:,}.", limit_bytes=limits.max_bytes
        )


def check_decoded_bytes(size: int, limits: DecodeLimits) -> None:
    if size > limits.max_decoded_bytes:
        raise DecodedTooLarge(
            f"The image would decode to {size:,} bytes of samples; the limit is "
            f"{limits.max_decoded_bytes:,}.",
            limit_bytes=limits.max_decoded_bytes,
        )


def check_segments(count: int, limits: DecodeLimits) -> None:
    if count > limits.max_image_segments:
        raise TooManySegments(
            f"The file holds more than {limits.max_image_segments:,} parts (JPEG markers, PNG chunks, GIF "
            "blocks or DICOM elements); real images hold far fewer."
        )


def check_structure(data: bytes, kind: str, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Refuses a JPEG, PNG or GIF (`kind`, from `sniff_format`) whose parts would cost its reader more
    than the limits allow (inference/image_structure.py), before any reader parses it."""
    if kind == "jpeg":
        parts = count_jpeg_parts(data, limits.max_image_segments)
        check_segments(parts.segments, limits)
        if parts.scans > limits.max_jpeg_scans:
            raise TooManyScans(f"The JPEG holds {parts.scans:,} scans; the limit is {limits.max_jpeg_scans}.")
        if parts.scans > 1:  # libjpeg holds all its coefficients (2 bytes a sample), whatever the draft
            check_decoded_bytes(parts.coefficient_bytes, limits)
    elif kind == "png":
        check_segments(count_png_chunks(data, limits.max_image_segments), limits)
    elif kind == "gif":
        check_segments(count_gif_blocks(data, limits.max_image_segments), limits)
