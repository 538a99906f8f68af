"""Hostile files and bodies for the hardening suite: each is one row of issue 13's table, built here.

They are small to send and expensive to accept: a decoder or parser that trusts what the file declares
spends seconds of CPU or a gigabyte of memory on them. `benchmarks/hostile_server.py` sends them to a
live server; `tests/test_hardening.py` runs that suite in CI.
"""

from __future__ import annotations

import io
import json
import struct

import numpy as np
from PIL import Image

SOS, EOI = 0xDA, 0xD9


def _jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment; a scan runs to the next marker that is not a restart or
    a stuffed 0xFF byte."""
    position, found = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == EOI:
            found.append((marker, position, position + 2))
            break
        end = position + 2 + struct.unpack(">H", data[position + 2 : position + 4])[0]
        if marker == SOS:
            while True:
                end = data.index(b"\xff", end)
                if data[end + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                    end += 2
                    continue
                break
        found.append((marker, position, end))
        position = end
    return found


def progressive_jpeg_with_scans(side: int = 6000, scans: int = 5000) -> bytes:
    """A flat grey progressive JPEG whose last scan is repeated `scans` times: about 60 bytes a scan,
    and libjpeg redoes a whole-image pass for each (about 80 s of CPU for 5,000 here)."""
    buffer = io.BytesIO()
    Image.new("L", (side, side), 128).save(buffer, "JPEG", progressive=True, quality=50)
    data = buffer.getvalue()
    segments = _jpeg_segments(data)
    _, start, end = [segment for segment in segments if segment[0] == SOS][-1]
    end_of_image = segments[-1][1]
    return data[:end_of_image] + data[start:end] * scans + data[end_of_image:]


def tiff_with_samples(side: int = 2000, samples: int = 64) -> bytes:
    """A zlib TIFF of side x side pixels with `samples` values each: a few hundred KB that decode to
    side * side * samples bytes (256 MB at the defaults)."""
    import tifffile

    buffer = io.BytesIO()
    planes = np.zeros((side, side, samples), np.uint8)
    tifffile.imwrite(buffer, planes, photometric="minisblack", planarconfig="contig", compression="zlib")
    return buffer.getvalue()


def tiff_with_depth(side: int = 2000, depth: int = 64) -> bytes:
    """A volumetric (SGI ImageDepth) tiled TIFF: `depth` slices of side x side, one image to a naive
    reader that sees only width and height."""
    import tifffile

    buffer = io.BytesIO()
    volume = np.zeros((depth, side, side), np.uint8)
    tifffile.imwrite(buffer, volume, volumetric=True, tile=(16, 256, 256), compression="zlib")
    return buffer.getvalue()


def png_rgba_under_pixel_limit(side: int = 6320) -> bytes:
    """An RGBA PNG just under a 40 MP pixel limit: 155 KB that decode to 160 MB, and to a gigabyte once
    converted to float."""
    buffer = io.BytesIO()
    Image.new("RGBA", (side, side), (10, 20, 30, 255)).save(buffer, "PNG", optimize=False, compress_level=9)
    return buffer.getvalue()


def ordinary_png(value: int = 90, size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size, value).save(buffer, "PNG")
    return buffer.getvalue()


def deeply_nested_json(depth: int = 100_000) -> bytes:
    """An OIP body whose inputs nest `depth` lists deep: a recursive parser's stack overflows."""
    return b'{"inputs": ' + b"[" * depth + b"]" * depth + b"}"


def json_with_empty_lists(megabytes: int = 16) -> bytes:
    """An OIP body of valid inputs whose parameters hold `megabytes` MB of `[]`: millions of objects."""
    filler = b"[]," * (megabytes * 1024 * 1024 // 3)
    return b'{"parameters": {"junk": [' + filler + b'[]]}, "inputs": []}'


def bytes_items(count: int, image: bytes) -> bytes:
    """An OIP BYTES request with `count` encoded images (more than any route accepts at once)."""
    import base64

    encoded = base64.b64encode(image).decode()
    tensor = {"name": "image_bytes", "shape": [count], "datatype": "BYTES", "data": [encoded] * count}
    return json.dumps({"inputs": [tensor]}).encode()
