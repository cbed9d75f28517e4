"""What an encoded image will cost to decode, read from its header alone, before any decoding.

A PNG or JPEG names its dimensions in its first bytes; a decoder allocates what they say. A
783 KB PNG can declare 16384x16384 pixels (a 768 MB bitmap, seconds of CPU), so the service
reads the header first and refuses anything larger than its model needs, or different from
the request's `shape`, without ever calling the decoder (see `CloudService._check_image`).

Pure functions over bytes-like objects; every malformed header raises `UnsafeImage` with a
one-line reason. Reading a header touches at most `MAX_SEGMENTS_BEFORE_FRAME` JPEG segments or
the first 33 bytes of a PNG, and counting JPEG scans is one C-speed pass over the payload.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM, RST0-7: no length field
MAX_SEGMENTS_BEFORE_FRAME = 256
# A progressive JPEG has about 10 scans; each scan is a pass over the whole image.
MAX_JPEG_SCANS = 64
_START_OF_SCAN = re.compile(rb"\xff\xda")
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}  # colour type -> channels once decoded (palette: RGB)


class UnsafeImage(ValueError):
    """An image header that is malformed or promises more work than allowed."""


@dataclass(frozen=True)
class ImageHeader:
    codec: str  # "jpeg" or "png"
    width: int
    height: int
    channels: int
    bits_per_sample: int
    scans: int = 1  # JPEG: start-of-scan markers (upper bound); PNG: 1

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_image_header(payload: Any, codec: str) -> ImageHeader:
    """The header of a "jpeg" or "png" payload (bytes, bytearray, memoryview). UnsafeImage if it
    is not one, or a JPEG has more than MAX_JPEG_SCANS scans."""
    view = memoryview(payload).cast("B") if not isinstance(payload, bytes | bytearray) else payload
    if codec == "png":
        return _png_header(view)
    if codec == "jpeg":
        return _jpeg_header(view)
    raise UnsafeImage(f"no header to read for codec '{codec}'")


def _png_header(data: Any) -> ImageHeader:
    if bytes(data[:8]) != PNG_SIGNATURE:
        raise UnsafeImage("not a PNG (no PNG signature)")
    if len(data) < 33:
        raise UnsafeImage("PNG ends before its IHDR chunk")
    length = int.from_bytes(data[8:12], "big")
    chunk = bytes(data[12:29])
    if length != 13 or chunk[:4] != b"IHDR":
        raise UnsafeImage("PNG does not start with an IHDR chunk")
    if zlib.crc32(chunk) != int.from_bytes(data[29:33], "big"):
        raise UnsafeImage("PNG IHDR chunk fails its CRC")
    width, height = int.from_bytes(chunk[4:8], "big"), int.from_bytes(chunk[8:12], "big")
    bit_depth, colour_type = chunk[12], chunk[13]
    if colour_type not in _PNG_CHANNELS or bit_depth not in (1, 2, 4, 8, 16):
        raise UnsafeImage(f"PNG colour type {colour_type} / bit depth {bit_depth} is not valid")
    if width == 0 or height == 0:
        raise UnsafeImage(f"PNG declares an empty image ({width}x{height})")
    return ImageHeader("png", width, height, _PNG_CHANNELS[colour_type], bit_depth)


def _jpeg_header(data: Any) -> ImageHeader:
    size = len(data)
    if size < 4 or data[0] != 0xFF or data[1] != 0xD8:
        raise UnsafeImage("not a JPEG (no start-of-image marker)")
    position = 2
    for _ in range(MAX_SEGMENTS_BEFORE_FRAME):
        if position >= size or data[position] != 0xFF:
            raise UnsafeImage(f"JPEG has no marker at byte {position}")
        while position < size and data[position] == 0xFF:  # fill bytes
            position += 1
        if position >= size:
            break
        marker = data[position]
        position += 1
        if marker in _STANDALONE_MARKERS:
            continue
        if marker in (0xD9, 0xDA):
            raise UnsafeImage("JPEG has no frame header before its image data")
        if position + 2 > size:
            break
        length = int.from_bytes(data[position:position + 2], "big")
        if length < 2:
            raise UnsafeImage(f"JPEG segment at byte {position} has length {length}")
        if marker in _SOF_MARKERS:
            if length < 8 or position + 8 > size:
                break
            precision = data[position + 2]
            height = int.from_bytes(data[position + 3:position + 5], "big")
            width = int.from_bytes(data[position + 5:position + 7], "big")
            channels = data[position + 7]
            if height == 0 or width == 0:
                raise UnsafeImage(f"JPEG declares an image of {width}x{height} (height defined later is not supported)")
            scans = _count_scans(data)
            if scans > MAX_JPEG_SCANS:
                raise UnsafeImage(f"JPEG has more than {MAX_JPEG_SCANS} scans")
            return ImageHeader("jpeg", width, height, channels, precision, scans)
        position += length
    else:
        raise UnsafeImage(f"JPEG has more than {MAX_SEGMENTS_BEFORE_FRAME} segments before its frame header")
    raise UnsafeImage("JPEG ends before its frame header")


def _count_scans(data: Any) -> int:
    """Start-of-scan markers (0xFFDA can occur nowhere else in entropy-coded data, which stuffs
    0xFF with 0x00; an embedded thumbnail's scans count too, an over-estimate), up to the cap + 1."""
    scans = 0
    for _ in _START_OF_SCAN.finditer(data):
        scans += 1
        if scans > MAX_JPEG_SCANS:
            break
    return scans
