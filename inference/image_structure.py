"""How many parts an image file holds, counted from its bytes before any decoder runs.

The readers we use parse a file's structure in Python, one part at a time: Pillow walks JPEG marker
segments, PNG chunks and GIF extension blocks, and libjpeg decodes a progressive JPEG one scan at a
time, every scan over the whole image. So a small file of many empty parts costs seconds: a 551 KB
6000x6000 JPEG of 5,000 progressive scans took 10-100 s to decode, 20 MB of empty JPEG comments 9 s and
300 MB, 18 MB of one-byte GIF comment blocks 4 s and 780 MB. `inference/decode_limits.py` compares these
counts with its limits and refuses such a file before it reaches a decoder.

Each count stops a little past `stop_after` parts, so counting a hostile file costs no more than
counting a legitimate one. A damaged structure ends the count where it breaks: the decoder that follows
reports the damage.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

# The next JPEG marker after a segment or inside entropy-coded data: 0xFF followed by neither a stuffed
# 0x00, a restart marker (0xD0-0xD7, part of a scan) nor another 0xFF (fill bytes before a marker).
_JPEG_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")
_JPEG_SOS, _JPEG_EOI = 0xDA, 0xD9
# Markers without a length field: TEM and SOI (RST0-7 are never matched above).
_JPEG_STANDALONE = (0x01, 0xD8)


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}


@dataclass(frozen=True)
class JpegParts:
    segments: int  # marker segments up to the end of the first image, scans included
    scans: int  # start-of-scan segments: a progressive JPEG decodes the whole image once per scan
    # What libjpeg holds for a JPEG of more than one scan (progressive, or one scan per component): every
    # DCT coefficient of the image, 2 bytes each, per component at its own sampling. 0 if no frame.
    coefficient_bytes: int


def _coefficient_bytes(data: bytes, position: int) -> int:
    """Coefficient bytes of the frame whose SOF segment starts at `position` (its 0xFF)."""
    if position + 10 > len(data):
        return 0
    height, width, count = struct.unpack_from(">HHB", data, position + 5)
    sampling = [data[i] for i in range(position + 11, min(len(data), position + 11 + 3 * count), 3)]
    if not sampling or width == 0 or height == 0:
        return 0
    h_max, v_max = max(max(s >> 4 for s in sampling), 1), max(max(s & 15 for s in sampling), 1)
    mcu_columns, mcu_rows = -(-width // (8 * h_max)), -(-height // (8 * v_max))  # whole MCUs
    blocks = sum(mcu_columns * (s >> 4) * mcu_rows * (s & 15) for s in sampling)
    return blocks * 64 * 2


def count_jpeg_parts(data: bytes, stop_after: int) -> JpegParts:
    """Marker segments and scans of the first image in a JPEG file (data after its EOI, such as the
    second picture of an MPO, is not decoded and not counted), and its frame's coefficient bytes."""
    segments = scans = coefficient_bytes = 0
    found = _JPEG_MARKER.search(data, 2)
    while found is not None and segments <= stop_after:
        position, marker = found.start(), data[found.start() + 1]
        if marker == _JPEG_EOI:
            break
        segments += 1
        scans += marker == _JPEG_SOS
        if marker in _JPEG_SOF and not coefficient_bytes:
            coefficient_bytes = _coefficient_bytes(data, position)
        end = position + 2
        if marker not in _JPEG_STANDALONE and end + 2 <= len(data):
            end += struct.unpack_from(">H", data, end)[0]
        found = _JPEG_MARKER.search(data, end)
    return JpegParts(segments, scans, coefficient_bytes)


def count_png_chunks(data: bytes, stop_after: int) -> int:
    """Chunks of a PNG file up to IEND: Pillow handles each one in Python."""
    chunks, position = 0, 8
    while position + 8 <= len(data) and chunks <= stop_after:
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if kind == b"IEND":
            break
        position += 12 + length  # length, type, data, CRC
    return chunks


def count_gif_blocks(data: bytes, stop_after: int) -> int:
    """Extension blocks and their data sub-blocks before a GIF's first image: Pillow reads each one in
    Python (and joins a comment's sub-blocks by repeated concatenation) before the first frame."""
    if len(data) < 13:
        return 0
    flags = data[10]
    position = 13 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)  # header, screen, colour table
    blocks = 0
    while position + 2 <= len(data) and data[position] == 0x21 and blocks <= stop_after:
        position += 2  # introducer and label
        blocks += 1
        while position < len(data) and data[position] and blocks <= stop_after:
            position += 1 + data[position]
            blocks += 1
        position += 1  # the block terminator
    return blocks
