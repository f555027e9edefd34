"""Budgets on an image file's structure, checked before Pillow or libjpeg walk it.

Pillow reads PNG chunks, JPEG markers and GIF blocks one at a time in Python, holding the GIL, with no
limit: a 2.4 MB PNG of 200,000 private chunks keeps `Image.open` busy for a second (measured; a 25 MB one,
ten) and fills a list with every chunk; a JPEG header's junk and fill bytes take a Python step each. libjpeg
decodes every scan of a progressive JPEG over the whole image however few bytes the scan takes: about 40 ms
a scan at 50 MP (measured), so a few hundred bytes of repeated scans cost seconds. The checks here stop at
the budget, and count scans with a C search, so their own cost is bounded.
"""

from __future__ import annotations

import re
import struct

from moderation.errors import Reason, Rejected

# libpng keeps at most this many ancillary chunks by default (its user_chunk_cache_max).
MAX_PNG_OTHER_CHUNKS = 1000
# Image-data chunks too: 25 MB in 65,536 chunks is chunks of 400 bytes; encoders write 8 KiB or more.
MAX_PNG_CHUNKS = 65_536
_PNG_DATA_CHUNKS = frozenset({b"IDAT", b"fdAT", b"fcTL"})  # fcTL: one a frame of an APNG

# Encoders write 1 (baseline) to about a dozen scans; nvImageCodec refuses more than 256 by default.
MAX_JPEG_SCANS = 64
# Segments before the first scan: APPn, DQT, DHT, SOF... an ICC profile takes at most 256 APP2 segments.
MAX_JPEG_HEADER_MARKERS = 1000
MAX_JPEG_JUNK_BYTES = 4096  # fill and stray bytes before the first scan
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})  # TEM, RSTn, SOI, EOI: no length field

# Extension sub-blocks before the first frame (comments, XMP, NETSCAPE looping): a few, or one a byte of XMP.
MAX_GIF_BLOCKS = 10_000


def check(data: bytes) -> None:
    """Rejected (invalid_image) when the file's structure is over budget; a truncated or malformed file
    passes, for Pillow to say what is wrong with it."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        _check_png(data)
    elif data.startswith(b"\xff\xd8\xff"):
        _check_jpeg(data)
    elif data.startswith((b"GIF87a", b"GIF89a")):
        _check_gif(data)


def _over(detail: str) -> Rejected:
    return Rejected(Reason.INVALID_IMAGE, f"over the structure budget: {detail}")


def _check_png(data: bytes) -> None:
    position, chunks, other = 8, 0, 0
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        other += kind not in _PNG_DATA_CHUNKS
        if other > MAX_PNG_OTHER_CHUNKS:
            raise _over(f"a PNG with more than {MAX_PNG_OTHER_CHUNKS} chunks besides the image data")
        if chunks > MAX_PNG_CHUNKS:
            raise _over(f"a PNG with more than {MAX_PNG_CHUNKS} chunks")
        if kind == b"IEND":
            return
        position += 12 + length


def _check_jpeg(data: bytes) -> None:
    position, markers, junk = 2, 0, 0
    while True:
        found = data.find(b"\xff", position)
        if found < 0 or found + 1 >= len(data):
            return
        fill = _JPEG_FILL.match(data, found)
        assert fill is not None  # data[found] is 0xFF
        marker_at = fill.end() - 1
        junk += marker_at - position
        if junk > MAX_JPEG_JUNK_BYTES:
            raise _over(f"a JPEG with more than {MAX_JPEG_JUNK_BYTES} fill or stray bytes before its first scan")
        if marker_at + 1 >= len(data):
            return
        marker = data[marker_at + 1]
        markers += 1
        if markers > MAX_JPEG_HEADER_MARKERS:
            raise _over(f"a JPEG with more than {MAX_JPEG_HEADER_MARKERS} segments before its first scan")
        if marker == 0xDA:
            break
        if marker == 0x00 or marker in _JPEG_STANDALONE:
            position = marker_at + 2
            continue
        if marker_at + 4 > len(data):
            return
        (length,) = struct.unpack_from(">H", data, marker_at + 2)
        position = marker_at + 2 + length
    # Entropy-coded data escapes every 0xFF, so each FF DA from here on starts a scan (or sits in a
    # segment between scans, which only errs on the safe side).
    scans = data.count(b"\xff\xda", marker_at)
    if scans > MAX_JPEG_SCANS:
        raise _over(f"a JPEG of {scans} scans, the budget is {MAX_JPEG_SCANS}")


def gif_frames(data: bytes, limit: int) -> int:
    """The frames (image descriptors) of a GIF, counted no further than `limit`: Pillow's `n_frames` walks
    every frame in Python, and a 25 MB GIF of tiny frames holds a million of them."""
    position, frames = _gif_blocks_start(data), 0
    while position < len(data) and frames < limit:
        introducer = data[position]
        if introducer == 0x2C:  # an image descriptor, its local colour table, the LZW code size, its data
            if position + 10 > len(data):
                break
            frames += 1
            packed = data[position + 9]
            position += 10 + ((3 << ((packed & 0x07) + 1)) if packed & 0x80 else 0) + 1
        elif introducer == 0x21:  # an extension: its label, then sub-blocks
            position += 2
        else:  # the trailer, or bytes Pillow stops at too
            break
        position = _after_sub_blocks(data, position)
    return frames


def _gif_blocks_start(data: bytes) -> int:
    """Where the blocks start: after the header, the logical screen descriptor and a global colour table."""
    if len(data) < 13:
        return len(data)
    return 13 + ((3 << ((data[10] & 0x07) + 1)) if data[10] & 0x80 else 0)


def _after_sub_blocks(data: bytes, position: int) -> int:
    while position < len(data) and (size := data[position]) != 0:
        position += 1 + size
    return position + 1  # the terminating empty sub-block


def _check_gif(data: bytes) -> None:
    if len(data) < 13:
        return
    position = _gif_blocks_start(data)
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # an extension, until the first frame (0x2C)
        position += 2  # introducer and label
        while position < len(data) and (size := data[position]) != 0:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise _over(f"a GIF with more than {MAX_GIF_BLOCKS} extension blocks before its first frame")
            position += 1 + size
        position += 1  # the terminating empty sub-block
