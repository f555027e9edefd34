"""Decode untrusted image bytes safely and preprocess them exactly as FakeVLM's CLIP processor does.

FakeVLM (llava-hf/llava-1.5-7b-hf's CLIPImageProcessor, no pad-to-square in the released eval):
resize the shortest edge to 336 (bicubic), center-crop 336x336, scale by 1/255, normalise with
CLIP's mean and std. `tests/test_imaging.py` pins this against transformers' own processor.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from moderation.errors import Reason, Rejected

CROP_SIZE = 336
SHORTEST_EDGE = 336
RESCALE_FACTOR = 1 / 255
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_MEAN = np.asarray(CLIP_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(CLIP_STD, dtype=np.float32).reshape(3, 1, 1)


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, fully loaded
    width: int
    height: int
    format: str


def decode(data: bytes, *, max_pixels: int) -> DecodedImage:
    """Decode bytes to an RGB image, refusing oversized images before their pixels are decoded."""
    if not data:
        raise Rejected(Reason.EMPTY_OBJECT, "the object has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        if isinstance(exc, UnidentifiedImageError):
            raise Rejected(Reason.INVALID_IMAGE, "the bytes are not an image Pillow can read") from exc
        raise Rejected(Reason.TOO_MANY_PIXELS, str(exc)) from exc
    except Exception as exc:  # Pillow raises many types on hostile headers
        raise Rejected(Reason.INVALID_IMAGE, f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width * height > max_pixels:
        raise Rejected(
            Reason.TOO_MANY_PIXELS, f"{width}x{height} is {width * height} pixels, the cap is {max_pixels}"
        )
    if width == 0 or height == 0:
        raise Rejected(Reason.INVALID_IMAGE, f"degenerate size {width}x{height}")
    fmt = image.format or "unknown"
    try:
        # Multi-frame images are judged on their first frame, like FakeVLM's eval (Image.open().convert).
        image.seek(0)
        rgb = to_rgb(image)
    except Exception as exc:
        raise Rejected(Reason.INVALID_IMAGE, f"corrupt or truncated {fmt} image: {exc}") from exc
    return DecodedImage(image=rgb, width=width, height=height, format=fmt)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB for every mode; 16-bit and float images are scaled to 8 bits (Pillow's convert would clip them)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        pixels = np.asarray(image, dtype=np.int64)
        shift = 8 if pixels.max(initial=0) > 255 else 0
        image = Image.fromarray((np.clip(pixels, 0, 65535) >> shift).astype(np.uint8), mode="L")
    elif image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), mode="L")
    return image.convert("RGB")


def resize_size(width: int, height: int, shortest_edge: int = SHORTEST_EDGE) -> tuple[int, int]:
    """Output (width, height) with the shortest edge at `shortest_edge`, as transformers computes it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (shortest_edge, new_long) if width <= height else (new_long, shortest_edge)


def preprocess(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> float32 CHW array of shape (3, 336, 336), FakeVLM's pixel_values for one image."""
    resized = image.resize(resize_size(*image.size), resample=Image.Resampling.BICUBIC)
    left = int((resized.width - CROP_SIZE) / 2.0)
    top = int((resized.height - CROP_SIZE) / 2.0)
    cropped = resized.crop((left, top, left + CROP_SIZE, top + CROP_SIZE))
    pixels = np.asarray(cropped, dtype=np.float32).transpose(2, 0, 1) * np.float32(RESCALE_FACTOR)
    return (pixels - _MEAN) / _STD
