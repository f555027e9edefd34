"""Real image files that are hard on a decoder, and real files of formats the worker does not read, for the
tests and bench/worst_images.py. Each is a valid file of its format (Pillow without an allowlist reads it)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def save(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with_private_chunks(count: int, *, size: tuple[int, int] = (64, 48), after_data: bool = False) -> bytes:
    """A greyscale PNG with `count` empty private chunks (`prIv`) before its image data, or after it."""
    plain = save(Image.new("L", size, 90), "PNG")
    private = png_chunk(b"prIv", b"") * count
    at = plain.rindex(b"IEND") - 4 if after_data else 8 + 25  # before IEND, or right after IHDR
    return plain[:at] + private + plain[at:]


def jpeg_segments(data: bytes) -> list[tuple[int, int, int]]:
    """(marker, start, end) of each segment of a JPEG; a scan's segment runs to the end of its entropy-coded data."""
    position, segments = 2, []
    while position < len(data):
        marker = data[position + 1]
        if marker == 0xD9:
            segments.append((marker, position, position + 2))
            break
        (length,) = struct.unpack_from(">H", data, position + 2)
        end = position + 2 + length
        if marker == 0xDA:
            while data[(end := data.index(b"\xff", end)) + 1] == 0 or 0xD0 <= data[end + 1] <= 0xD7:
                end += 2
        segments.append((marker, position, end))
        position = end
    return segments


def progressive_jpeg(size: tuple[int, int], extra_scans: int = 0, *, mode: str = "L") -> bytes:
    """A progressive JPEG of a flat picture whose last scan (with the Huffman table before it) is repeated
    `extra_scans` more times: a hundred bytes each, and a pass of libjpeg over the whole image each."""
    data = save(Image.new(mode, size, 128), "JPEG", progressive=True, quality=90)
    segments = jpeg_segments(data)
    last = max(i for i, segment in enumerate(segments) if segment[0] == 0xDA)
    first = last - 1 if segments[last - 1][0] == 0xC4 else last
    repeated = data[segments[first][1] : segments[last][2]]
    end = segments[-1][1]  # EOI
    return data[:end] + repeated * extra_scans + data[end:]


def sixteen_bit_png(size: tuple[int, int]) -> bytes:
    """A 16-bit greyscale PNG (mode I;16) of a ramp over the full 16-bit range: compresses to little."""
    width, height = size
    ramp = (np.arange(width, dtype=np.uint32) * 65535 // max(1, width - 1)).astype(np.uint16)
    return save(Image.fromarray(np.broadcast_to(ramp, (height, width)).copy()), "PNG", compress_level=9)


def rgb_png(size: tuple[int, int]) -> bytes:
    """An 8-bit RGB PNG of a horizontal ramp: libspng's kind of PNG, small however large."""
    width, height = size
    ramp = (np.arange(width) * 255 // max(1, width - 1)).astype(np.uint8)
    row = np.stack([ramp, ramp[::-1], np.full_like(ramp, 128)], axis=-1)
    return save(Image.fromarray(np.broadcast_to(row, (height, width, 3)).copy()), "PNG", compress_level=9)


def float_tiff(size: tuple[int, int]) -> bytes:
    """A 32-bit float TIFF (mode F) with values in [0, 1], deflated: 4 bytes a pixel once decoded."""
    width, height = size
    ramp = np.repeat(np.linspace(0, 1, 64, dtype=np.float32), -(-width // 64))[:width]
    image = Image.fromarray(np.broadcast_to(ramp, (height, width)).copy(), mode="F")
    return save(image, "TIFF", compression="tiff_adobe_deflate")


def animated_gif(size: tuple[int, int], frames: int) -> bytes:
    """An animated GIF of `frames` full-size frames (flat greys, so small however large; each frame a grey of its
    own, as Pillow merges identical frames into one)."""
    pictures = [Image.new("L", size, index * 61 % 256) for index in range(frames)]
    return save(pictures[0], "GIF", save_all=True, append_images=pictures[1:], duration=100, loop=0)


def psd(size: tuple[int, int]) -> bytes:
    """A minimal 8-bit RGB Photoshop file, raw pixel data: Pillow writes no PSD, so it is written here."""
    width, height = size
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3)
    sections = struct.pack(">III", 0, 0, 0)  # colour mode data, image resources, layers and masks: empty
    return header + sections + struct.pack(">H", 0) + bytes(3 * width * height)


# Formats outside the default allowlist that the installed Pillow writes, each with the mode it takes.
OTHER_FORMATS = {
    "EPS": "RGB",
    "ICO": "RGB",
    "PCX": "RGB",
    "DDS": "RGB",
    "SGI": "RGB",
    "PPM": "RGB",
    "QOI": "RGB",
    "ICNS": "RGB",
    "JPEG2000": "RGB",
    "MSP": "1",
    "XBM": "1",
    "TGA": "RGB",
}


def other_format(fmt: str, size: tuple[int, int] = (32, 32)) -> bytes:
    if fmt == "PSD":
        return psd(size)
    return save(Image.new(OTHER_FORMATS[fmt], size), fmt)
