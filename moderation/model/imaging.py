"""Decode untrusted image bytes safely and preprocess them exactly as FakeVLM's CLIP processor does.

FakeVLM (llava-hf/llava-1.5-7b-hf's CLIPImageProcessor, no pad-to-square in the released eval):
resize the shortest edge to 336 (bicubic), center-crop 336x336, scale by 1/255, normalise with
CLIP's mean and std. `tests/model/test_imaging.py` pins this against transformers' own processor. JPEGs in
YCbCr or grey (nearly every upload) are decoded by libjpeg-turbo straight into numpy (`jpeg_rgb`): the same
pixels as Pillow's, for less CPU.
`decode_for_model` goes from bytes to the same pixels (within a stated tolerance) several times faster:
large JPEGs decoded at reduced scale, PNGs by libspng, the resize by torch's vectorised kernel.
"""

from __future__ import annotations

import io
import math
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from moderation.errors import Reason, Rejected
from moderation.model import require_model_extra, structure

CROP_SIZE = 336
SHORTEST_EDGE = 336
RESCALE_FACTOR = 1 / 255
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)


# Parsed at all unless the settings say otherwise (MODERATION_IMAGE_FORMATS): Pillow has some 40 readers
# (EPS, PSD, FITS, WMF...), each a parser of untrusted bytes. Names the installed Pillow lacks are left out.
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF")


def readable(formats: tuple[str, ...]) -> tuple[str, ...]:
    """The formats, in their order, that the installed Pillow (with its plugins) can open."""
    Image.init()
    return tuple(name for name in (f.upper() for f in formats) if name in Image.OPEN)


@dataclass(frozen=True)
class Header:
    """An image whose header is read and checked, none of its pixels decoded."""

    image: Image.Image  # lazy: owned by whoever decodes it
    data: bytes
    width: int
    height: int
    format: str

    @property
    def pixels(self) -> int:
        return self.width * self.height


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, fully loaded
    width: int
    height: int
    format: str


def decode(data: bytes, *, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS) -> DecodedImage:
    """Decode bytes to an RGB image, refusing oversized images before their pixels are decoded."""
    return decode_header(read_header(data, max_pixels=max_pixels, formats=formats))


def decode_header(header: Header) -> DecodedImage:
    image = _load_rgb(header.image, header.format)
    return DecodedImage(image=image, width=header.width, height=header.height, format=header.format)


def read_header(data: bytes, *, max_pixels: int, formats: tuple[str, ...] = DEFAULT_FORMATS) -> Header:
    """Check the file's structure budget, then read the header of an allowed format only: a Header, or
    Rejected before any pixel is decoded."""
    if not data:
        raise Rejected(Reason.EMPTY_OBJECT, "the object has zero bytes")
    structure.check(data)
    allowed = readable(formats)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=allowed)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if not isinstance(exc, UnidentifiedImageError):
            raise Rejected(Reason.TOO_MANY_PIXELS, str(exc)) from exc
        if other := _other_format(data, allowed):
            detail = f"the bytes carry the signature of {other}, not of a format read ({', '.join(allowed)})"
            raise Rejected(Reason.UNSUPPORTED_FORMAT, detail) from exc
        raise Rejected(Reason.INVALID_IMAGE, "the bytes are not an image Pillow can read") from exc
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise Rejected(Reason.INVALID_IMAGE, f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(Reason.TOO_MANY_PIXELS, f"{width}x{height} is {width * height} pixels, the cap is {max_pixels}")
    if width == 0 or height == 0:
        raise Rejected(Reason.INVALID_IMAGE, f"degenerate size {width}x{height}")
    return Header(image=image, data=data, width=width, height=height, format=image.format or "unknown")


def _other_format(data: bytes, allowed: tuple[str, ...]) -> str | None:
    """The first format outside the allowlist whose signature the bytes carry, from its 16-byte prefix
    only (the check Pillow makes before it parses): never parsed. Formats without a signature (TGA) stay
    invalid images."""
    prefix = data[:16]
    for name, (_, accept) in Image.OPEN.items():
        if name in allowed or accept is None:
            continue
        try:
            if accept(prefix):
                return name
        except Exception:  # noqa: S112 - a signature check that fails on odd bytes is not a match
            continue
    return None


def _load_rgb(image: Image.Image, fmt: str) -> Image.Image:
    try:
        return to_rgb(_first_frame_8bit(image))
    except Exception as exc:
        raise Rejected(Reason.INVALID_IMAGE, f"corrupt or truncated {fmt} image: {exc}") from exc


def _rgb_array(image: Image.Image, fmt: str) -> np.ndarray:
    """HWC uint8 RGB, converted a band of rows at a time into one array: no whole-image RGB image in Pillow
    (4 bytes a pixel) and no whole-image `tobytes` (3, twice over while its chunks are joined)."""
    try:
        image = _first_frame_8bit(image)
        width, height = image.size
        out = np.empty((height, width, 3), dtype=np.uint8)
        for top, bottom in _bands(width, height):
            band = image.crop((0, top, width, bottom))
            out[top:bottom] = np.asarray(band if band.mode == "RGB" else band.convert("RGB"))
        return out
    except Exception as exc:
        raise Rejected(Reason.INVALID_IMAGE, f"corrupt or truncated {fmt} image: {exc}") from exc


def _first_frame_8bit(image: Image.Image) -> Image.Image:
    """The first frame, loaded, 16-bit and float images scaled to 8 bits (the wide image freed at once)."""
    # The first frame, as FakeVLM's eval reads an image (Image.open().convert); moderation.model.frames
    # judges the others.
    image.seek(0)
    image.load()
    if image.mode not in _WIDE_MODES:
        return image
    eight_bits = to_l(image)
    image.close()  # the wide image is the largest buffer: freed before the RGB one is made
    return eight_bits


_WIDE_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I", "F"})
_BAND_PIXELS = 1 << 20  # rows converted at a time: their temporaries stay a few MB whatever the image's size


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode (an RGB image itself, not a copy); 16-bit and float images are scaled to 8 bits
    (Pillow's convert would clip them)."""
    if image.mode == "RGB":
        return image
    return (to_l(image) if image.mode in _WIDE_MODES else image).convert("RGB")


def to_l(image: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit or float image scaled to 8-bit greyscale: integers shifted down 8 bits when any
    exceeds 255, floats in [0, 1] times 255; then clipped. A band of rows at a time, so no temporary is
    the image's size (a whole-image int64 or float64 copy of 50 MP is 400 MB)."""
    width, height = image.size
    bands = _bands(width, height)
    peak = max(float(np.nan_to_num(_band(image, band)).max(initial=0)) for band in bands)
    if image.mode == "F":
        scale = 255.0 if peak <= 1.0 else 1.0

        def to_8bit(pixels: np.ndarray) -> np.ndarray:
            return np.clip(np.nan_to_num(pixels.astype(np.float64)) * scale, 0, 255).astype(np.uint8)
    else:
        shift = 8 if peak > 255 else 0

        def to_8bit(pixels: np.ndarray) -> np.ndarray:
            return (np.clip(pixels.astype(np.int32), 0, 65535) >> shift).astype(np.uint8)

    out = np.empty((height, width), dtype=np.uint8)
    for top, bottom in bands:
        out[top:bottom] = to_8bit(_band(image, (top, bottom)))
    return Image.fromarray(out, mode="L")


def _bands(width: int, height: int) -> list[tuple[int, int]]:
    rows = max(1, _BAND_PIXELS // width)
    return [(top, min(top + rows, height)) for top in range(0, height, rows)]


def _band(image: Image.Image, rows: tuple[int, int]) -> np.ndarray:
    return np.asarray(image.crop((0, rows[0], image.width, rows[1])))


DECODE_SLACK = 16 * 1024 * 1024
# Bytes a pixel in Pillow's own buffers: every mode not listed here is kept in 4 (RGB as RGBX).
_STORED_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}


def decode_bytes(header: Header) -> int:
    """An upper bound on the pixel memory that decoding this image holds at its peak: the image in its own
    mode, its 8-bit copy when it is 16-bit or float, then the RGB image (4 bytes a pixel; the fast path's
    RGB array takes 3), and DECODE_SLACK for bands and decoder buffers; libjpeg's coefficients (2 bytes a
    sample of every component) for a progressive JPEG, whatever its scale."""
    mode = header.image.mode
    per_pixel = _STORED_BYTES.get(mode, 4) + (1 if mode in _WIDE_MODES else 0) + 4
    total = header.pixels * per_pixel + DECODE_SLACK
    if header.format in ("JPEG", "MPO") and header.image.info.get("progressive"):
        total += header.pixels * 2 * max(1, len(getattr(header.image, "layer", ())))
    return total


def resize_size(width: int, height: int, shortest_edge: int = SHORTEST_EDGE) -> tuple[int, int]:
    """Output (width, height) with the shortest edge at `shortest_edge`, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def preprocess(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array of shape (3, 336, 336), FakeVLM's pixel_values for one image."""
    return normalise(crop(image))


def crop(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> the uint8 HWC (336, 336, 3) crop that `normalise` turns into pixel_values: what the
    worker sends Triton (339 KB an image, a quarter of the float32 pixel_values), normalised on its side."""
    size = resize_size(*image.size)
    # Pillow's resize to the image's own size is a copy: skipped
    resized = image if size == image.size else image.resize(size, resample=Image.Resampling.BICUBIC)
    left = int((resized.width - CROP_SIZE) / 2.0)
    top = int((resized.height - CROP_SIZE) / 2.0)
    return np.ascontiguousarray(resized.crop((left, top, left + CROP_SIZE, top + CROP_SIZE)), dtype=np.uint8)


# The fast path: nearly the same pixels (see FAST_MAX_ABS_DIFF) from a fraction of the decoding and resampling.

# How far `decode_for_model` may stray from `preprocess` on the fully decoded image (= transformers'
# CLIPImageProcessor), in normalised units (one 8-bit level is ~0.015 of them). PNG and the other
# lossless formats: one 8-bit level where the image shrinks, two where it is enlarged (torch's and
# Pillow's fixed-point rounding). JPEG, decoded at reduced scale in the DCT domain at REDUCING_GAP 2,
# on 1 to 12 MP photo-like images: measured max 0.142 (a few pixels on sharp edges), mean 0.0037.
# tests/model/test_fast_preprocess.py and bench/preprocess.py check both.
FAST_MAX_ABS_DIFF = 0.15
FAST_MEAN_ABS_DIFF = 0.005
# A drafted JPEG keeps its shortest edge at least this many times 336, so that the bicubic step that
# follows averages out the DCT scaling. 1: fastest; larger: closer to the reference.
REDUCING_GAP = 2.0


@dataclass(frozen=True)
class ModelInput:
    """One image made ready for FakeVLM: its crop, and the original's size and format."""

    pixels: np.ndarray  # uint8 (336, 336, 3) HWC RGB, C-contiguous: `normalise` makes it pixel_values
    width: int  # of the original image, as decoded by `decode`
    height: int
    format: str
    # the whole image in RGB, longest side <= `preview` px, when asked for; read only
    preview: Image.Image | None = None


def prepare(
    data: bytes, *, max_pixels: int, fast: bool = False, formats: tuple[str, ...] = DEFAULT_FORMATS
) -> ModelInput:
    """CPU-bound: read the header, then decode and crop one image. `fast`: `decode_for_model`, within its
    stated tolerance of the exact path (`crop(decode(...).image)`)."""
    return prepare_header(read_header(data, max_pixels=max_pixels, formats=formats), fast=fast)


def prepare_header(header: Header, *, fast: bool = False, preview: int = 0) -> ModelInput:
    """`prepare` from an image whose header is read. `preview` > 0: also a small RGB image of the whole
    picture (for perceptual hashing), made from the pixels decoded anyway."""
    if fast:
        return model_input(header, preview=preview)
    array = jpeg_rgb(header)
    rgb: Image.Image | None
    if array is None:
        rgb = decode_header(header).image
        pixels = crop(rgb)
    else:  # one copy into Pillow, and only where a resize or the preview needs it
        at_size = resize_size(header.width, header.height) == (header.width, header.height)
        rgb = Image.fromarray(array) if preview > 0 or not at_size else None
        pixels = center_crop(array) if at_size or rgb is None else crop(rgb)
    return ModelInput(
        pixels=pixels,
        width=header.width,
        height=header.height,
        format=header.format,
        preview=preview_of(rgb, preview) if rgb is not None and preview > 0 else None,
    )


def jpeg_rgb(header: Header) -> np.ndarray | None:
    """The RGB pixels of a YCbCr or greyscale JPEG, decoded by libjpeg-turbo through simplejpeg straight into
    a numpy array: the pixels Pillow decodes (the same library, IDCT and upsampling; tests/model/test_imaging.py
    pins them equal), at two thirds of the CPU, without Pillow's 4-byte buffer and its copy into numpy, and
    with the GIL let go once instead of at every step. None where Pillow decides as before: another colour
    space (CMYK, YCCK), a size libjpeg reads differently from Pillow, or any file libjpeg warns about (Pillow
    accepts some warnings and refuses a truncated file)."""
    if header.format != "JPEG" or header.image.mode not in ("RGB", "L"):
        return None
    import simplejpeg  # here, as pyspng: the model code sharing this module runs where only torch is installed

    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(header.data)
        if (width, height) != (header.width, header.height):
            return None
        return simplejpeg.decode_jpeg(header.data, colorspace="RGB", strict=True)
    except ValueError:  # libjpeg's error or warning: Pillow's rules apply
        return None


def center_crop(rgb: np.ndarray) -> np.ndarray:
    """The 336x336 centre of an HWC array whose shortest edge is 336 already (where `crop`'s resize is a no-op)."""
    height, width = rgb.shape[:2]
    left, top = int((width - CROP_SIZE) / 2.0), int((height - CROP_SIZE) / 2.0)
    return np.ascontiguousarray(rgb[top : top + CROP_SIZE, left : left + CROP_SIZE])


def preview_of(rgb: Image.Image, size: int) -> Image.Image:
    """The whole picture, longest side <= `size` px (`rgb` itself when it is that small)."""
    if max(rgb.size) <= size:
        return rgb  # read only, by the hash
    # reducing_gap: a box reduction first, then the filter over a few times the target size only
    return rgb.resize(_within(rgb.size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)


def _within(size: tuple[int, int], longest: int) -> tuple[int, int]:
    scale = longest / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def decode_for_model(
    data: bytes, *, max_pixels: int, reducing_gap: float = REDUCING_GAP, formats: tuple[str, ...] = DEFAULT_FORMATS
) -> ModelInput:
    """Bytes -> FakeVLM's uint8 crop, several times faster than `crop(decode(...).image)`.

    Same checks and Rejected reasons as `decode` (the pixel cap read from the header, before any pixel is
    decoded); width, height and format are the original image's. Where the time goes instead:
    - a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (`Image.draft`), keeping its shortest
      edge at least reducing_gap * 336;
    - an 8-bit PNG up to SPNG_MAX_PIXELS is decoded by libspng (pyspng), about twice as fast as Pillow,
      to the same pixels;
    - the antialiased bicubic resize is torch's uint8 kernel (vectorised; Pillow's is scalar), which
      computes Pillow's filter to within one 8-bit level of rounding, 5 to 8 times faster;
    - an image already at 336 on its shortest edge is only cropped, as the reference's resize is a no-op.
    Normalised, the result is within FAST_MAX_ABS_DIFF (max) and FAST_MEAN_ABS_DIFF (mean) of `preprocess`,
    in normalised units; reducing_gap 3 roughly halves a JPEG's difference, at some cost in speed.
    """
    return model_input(read_header(data, max_pixels=max_pixels, formats=formats), reducing_gap=reducing_gap)


def model_input(header: Header, *, reducing_gap: float = REDUCING_GAP, preview: int = 0) -> ModelInput:
    """`decode_for_model` from an image whose header is read."""
    image, width, height, fmt = header.image, header.width, header.height, header.format
    new_width, new_height = resize_size(width, height)
    extent = (float(width), float(height))  # the original image, in the decoded image's pixels
    if fmt == "JPEG":
        # The decoder picks the largest DCT scale that keeps both sides >= the requested size; its
        # image is the original's size divided by the scale, rounded up.
        drafted = image.draft("RGB", (math.ceil(new_width * reducing_gap), math.ceil(new_height * reducing_gap)))
        if drafted is not None:
            _, (_, _, extent_width, extent_height) = drafted
            extent = (float(extent_width), float(extent_height))
    if fmt == "PNG" and image.mode in _SPNG_MODES and header.pixels <= SPNG_MAX_PIXELS:
        rgb = _png_rgb(header.data)
    else:
        rgb = _rgb_array(image, fmt)
    pixels = _resize_crop(rgb, extent, (new_width, new_height))
    small = preview_of(Image.fromarray(rgb), preview) if preview > 0 else None
    return ModelInput(pixels=pixels, width=width, height=height, format=fmt, preview=small)


_SPNG_MODES = frozenset({"RGB", "RGBA", "L", "LA", "P", "1"})  # 8 bits or fewer a sample: same RGB as Pillow
# pyspng holds the GIL while it decodes (Pillow's decoders let it go): about 15 ms a megapixel, measured,
# which the event loop waits out. Larger PNGs go to Pillow, twice as slow but off the loop's back.
SPNG_MAX_PIXELS = 2_000_000


def _png_rgb(data: bytes) -> np.ndarray:
    """libspng's RGB8 of an 8-bit PNG: what Pillow's convert("RGB") gives (alpha dropped, palette expanded)."""
    import pyspng  # here, so the model code that shares this module runs where only torch is installed (a GPU box)

    try:
        return pyspng.load(data, format="RGB")
    except Exception as exc:  # pyspng raises RuntimeError("pyspng: could not decode image: ...")
        raise Rejected(Reason.INVALID_IMAGE, f"corrupt or truncated PNG image: {exc}") from exc


def require_fast_path() -> None:
    """The fast path resizes with torch, which a slim install lacks: say so at start, not on the first image."""
    require_model_extra("MODERATION_FAST_PREPROCESS=true (torch's resize)", ("torch",))


def warm_up() -> None:
    """Import torch and run its resize once, so that the first event does not pay for either (seconds)."""
    side = 2 * CROP_SIZE
    _resize_crop(np.zeros((side, side, 3), np.uint8), (side, side), (CROP_SIZE, CROP_SIZE))


def _resize_crop(rgb: np.ndarray, extent: tuple[float, float], size: tuple[int, int]) -> np.ndarray:
    """HWC uint8 -> the reference's bicubic resize to `size` and center crop, uint8 HWC (336, 336, 3).

    `extent` is the original image's (width, height) in `rgb`'s pixels: its own size, or a drafted JPEG's
    fractional one, so that every output pixel samples the same spot of the picture as the reference."""
    import torch  # the `model` extra (require_fast_path): the worker's exact path and a slim install do without

    new_width, new_height = size
    if rgb.shape[:2] != (new_height, new_width):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # Pillow's buffers are read-only; torch only reads it
            channels_last = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)
        # aten's op, as F.interpolate takes either an output size or scale factors, and this needs both.
        resized = torch.ops.aten._upsample_bicubic2d_aa.default(
            channels_last, [new_height, new_width], False, new_height / extent[1], new_width / extent[0]
        )
        rgb = resized[0].permute(1, 2, 0).numpy()
    left = int((new_width - CROP_SIZE) / 2.0)
    top = int((new_height - CROP_SIZE) / 2.0)
    return np.ascontiguousarray(rgb[top : top + CROP_SIZE, left : left + CROP_SIZE])


def normalise(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 -> float32 CHW: x * (1/255), minus CLIP's mean, over its std, in float32 as transformers does.

    Channel by channel into the output, in place: four times faster than converting the whole array and
    broadcasting, with the same float32 operations in the same order."""
    height, width = rgb.shape[:2]
    out = np.empty((3, height, width), dtype=np.float32)
    for channel in range(3):
        np.multiply(rgb[:, :, channel], np.float32(RESCALE_FACTOR), out=out[channel], dtype=np.float32)
    out -= _MEAN
    out /= _STD
    return out
