"""Procedural "real" and "fake" images with known answers, for training and testing a tiny FakeVLM.

Both classes share the same content: four FakeClue-like categories (a still life, a landscape, an
aerial view, a document page) drawn from gradients, shapes, textures and noise. A real image then
goes through a camera: slight lens blur, vignetting and signal-dependent sensor noise at full
resolution. A fake image, or one region of it as an inpainting would, goes through a generator
instead: synthesised at half resolution and upsampled 2x, which leaves a genuine fingerprint of
one of two kinds, each the signature of one simulated generator (the same sign, the same stamp):

- `checkerboard`: a stride-2 transposed convolution with kernel 3 overlaps its outputs unevenly, so
  even and odd pixels get different gains: a period-2 checkerboard, spectral peaks at Nyquist;
- `grid`: a stride-8 decoder (as in latent-diffusion VAEs) stamps the same 8x8 pattern on every
  block: periodic spectral peaks at multiples of 1/8 cycle per pixel.

Images are 336 px on their shortest edge (336x336, 448x336 or 336x448), so FakeVLM's preprocessing
(shortest edge to 336, center crop) never resamples them: a period-2 pattern would not survive a
downscale, nor lossy compression (store them as PNG). The center crop starts at an even offset
that is a multiple of 8 (56), so both patterns keep their phase. Regions are quadrants or the
center of the full image; the crop keeps part of every quadrant, so the answer stays true.

Every sample is a pure function of `(seed, index)`; answers follow FakeVLM's format: the verdict
sentence `This is a fake image.` / `This is a real image.`, then which artifact and where, or why.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw

from moderation.model.fakevlm import PROMPT

Label = Literal["fake", "real"]
CATEGORIES = ("object", "scenery", "satellite", "doc")
ARTIFACTS = ("checkerboard", "grid")
REGIONS = ("whole", "upper-left", "upper-right", "lower-left", "lower-right", "center")
SIZES = ((336, 336), (448, 336), (336, 448))  # (width, height); never resampled by preprocessing
GRID_PERIOD = 8

_SUBJECT = {
    "object": "The still life",
    "scenery": "The landscape",
    "satellite": "The aerial view",
    "doc": "The document page",
}
_WHERE = {
    "whole": "across the whole image",
    "upper-left": "in the upper left corner",
    "upper-right": "in the upper right corner",
    "lower-left": "in the lower left corner",
    "lower-right": "in the lower right corner",
    "center": "in the center",
}
_ARTIFACT_TEXT = {
    "checkerboard": "A checkerboard pattern left by transposed convolution upsampling appears",
    "grid": "A periodic grid of 8 pixel blocks from the decoder creates spectral peaks",
}
_REAL_TEXT = "shows even sensor noise and soft lens blur, with no periodic upsampling pattern anywhere."

Rgb = tuple[float, float, float]
Float = np.ndarray  # float32 (H, W[, 3]) arrays in 0..255


@dataclass(frozen=True)
class Sample:
    image: Image.Image  # RGB
    label: Label
    category: str
    answer: str  # FakeVLM's format: verdict sentence, then the explanation
    artifact: str | None  # fakes only: one of ARTIFACTS
    region: str | None  # fakes only: one of REGIONS


def answer_for(label: Label, category: str, artifact: str | None = None, region: str | None = None) -> str:
    """The reference answer: first sentence the verdict, then which artifact and where, or why real."""
    subject = _SUBJECT[category]
    if label == "real":
        return f"This is a real image. {subject} {_REAL_TEXT}"
    if artifact is None or region is None:
        raise ValueError("a fake answer needs its artifact and region")
    where = f"{_ARTIFACT_TEXT[artifact]} {_WHERE[region]}."
    return f"This is a fake image. {subject} looks plausible at first glance. {where}"


def answer_corpus() -> list[str]:
    """Every answer the generator can produce (for training a tokenizer that knows their words)."""
    answers = [answer_for("real", c) for c in CATEGORIES]
    answers += [answer_for("fake", c, a, r) for c in CATEGORIES for a in ARTIFACTS for r in REGIONS]
    return answers


def make_sample(seed: int, index: int) -> Sample:
    """Sample `index` of the stream `seed`: even indices are fake, odd ones real (balanced batches)."""
    rng = np.random.default_rng([seed, index])
    label: Label = "fake" if index % 2 == 0 else "real"
    category = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
    width, height = SIZES[int(rng.choice(len(SIZES), p=[0.6, 0.2, 0.2]))]
    content = _CONTENT[category](rng, width, height)
    photo = _camera(rng, content)
    if label == "real":
        return Sample(_to_image(photo), label, category, answer_for(label, category), None, None)
    artifact = ARTIFACTS[int(rng.integers(len(ARTIFACTS)))]
    region = REGIONS[int(rng.integers(len(REGIONS)))]
    generated = _generator(rng, content, artifact)
    mask = region_mask(region, width, height)[..., None]
    pixels = generated * mask + photo * (1.0 - mask)
    return Sample(_to_image(pixels), label, category, answer_for(label, category, artifact, region), artifact, region)


def samples(n: int, seed: int, *, start: int = 0) -> Iterator[Sample]:
    """Samples `start .. start+n-1` of the stream `seed`."""
    for index in range(start, start + n):
        yield make_sample(seed, index)


def write_images(directory: Path, n: int, seed: int) -> list[Path]:
    """Write samples 0..n-1 of stream `seed` as lossless PNGs named by their truth (`fake-00000.png`)."""
    return [path for path, _ in _write(Path(directory), n, seed)]


def write_fakeclue(directory: Path, n: int, seed: int) -> Path:
    """Write `n` PNG images and a FakeClue-format json list (label 0 = fake, 1 = real); return the json."""
    directory = Path(directory)
    records = [
        {
            "image": path.relative_to(directory).as_posix(),
            "label": 0 if sample.label == "fake" else 1,
            "cate": sample.category,
            "width": sample.image.width,
            "height": sample.image.height,
            "conversations": [
                {"from": "human", "value": PROMPT},
                {"from": "gpt", "value": sample.answer},
            ],
        }
        for path, sample in _write(directory / "images", n, seed)
    ]
    path = directory / "fakeclue.json"
    path.write_text(json.dumps(records, indent=1) + "\n")
    return path


def _write(directory: Path, n: int, seed: int) -> list[tuple[Path, Sample]]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for index, sample in enumerate(samples(n, seed)):
        path = directory / f"{sample.label}-{index:05d}.png"
        sample.image.save(path, format="PNG")  # lossless: JPEG would smear the fingerprint
        written.append((path, sample))
    return written


def region_mask(region: str, width: int, height: int) -> np.ndarray:
    """1.0 inside `region` of a width x height image, 0.0 outside, with a 3-pixel feathered edge."""
    half_w, half_h = width // 2, height // 2
    boxes = {
        "whole": (0, 0, width, height),
        "upper-left": (0, 0, half_w, half_h),
        "upper-right": (half_w, 0, width, half_h),
        "lower-left": (0, half_h, half_w, height),
        "lower-right": (half_w, half_h, width, height),
        "center": (width // 4, height // 4, width - width // 4, height - height // 4),
    }
    if region == "whole":
        return np.ones((height, width))
    x0, y0, x1, y1 = boxes[region]

    def inside(coords: np.ndarray, low: int, high: int, size: int) -> np.ndarray:
        # Distance to the box's inner edges only: where the box meets the image border, no feather.
        to_low = coords - low if low > 0 else np.inf
        to_high = high - coords if high < size else np.inf
        return np.clip(np.minimum(to_low, to_high) / 3.0 + 0.5, 0.0, 1.0)

    xs, ys = np.arange(width) + 0.5, np.arange(height) + 0.5
    return inside(ys, y0, y1, height)[:, None] * inside(xs, x0, x1, width)[None, :]


def periodic_peak_ratio(image: Image.Image, *, block: int = 32) -> float:
    """How far the strongest synthesis-fingerprint frequency stands above the spectrum around it.

    The power spectrum is averaged over `block` x `block` tiles (Welch), then each frequency where a
    fingerprint puts its energy is compared with its neighbours: the Nyquist frequencies
    (checkerboard) and multiples of 1/8 cycle per pixel in both directions (grid). Camera images have
    no peaks there; straight content edges (text lines, horizons) spread smoothly along an axis, so
    an axis frequency is compared with its neighbours on that same axis.
    """
    gray = np.asarray(image.convert("L"), dtype=np.float64)
    residual = gray - _blur(gray, 1.0)  # the fingerprints live in the high frequencies
    rows, cols = residual.shape[0] // block, residual.shape[1] // block
    tiles = residual[: rows * block, : cols * block].reshape(rows, block, cols, block).swapaxes(1, 2)
    power = (np.abs(np.fft.fft2(tiles)) ** 2).mean(axis=(0, 1))
    nyquist, step = block // 2, block // GRID_PERIOD
    along = [k for k in range(-3, 4) if k]
    ratios = [
        power[nyquist, 0] / np.median([power[nyquist + k, 0] for k in along]),
        power[0, nyquist] / np.median([power[0, nyquist + k] for k in along]),
    ]
    window = np.arange(-2, 3)
    for fy in range(step, block, step):
        for fx in range(step, block, step):
            around = power[np.ix_((fy + window) % block, (fx + window) % block)]
            ratios.append(power[fy, fx] / np.median(around))
    return float(max(ratios))


# --- content, shared by both classes ---------------------------------------------------------------


def _colour(rng: np.random.Generator, low: float = 50, high: float = 230) -> Rgb:
    r, g, b = rng.uniform(low, high, 3)
    return (float(r), float(g), float(b))


def _value_noise(rng: np.random.Generator, width: int, height: int, cells: int) -> Float:
    """Smooth noise in -1..1: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(0, 255, (cells, max(2, cells * width // height))).astype(np.uint8)
    smooth = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(smooth, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def _draw(base: Float, shapes: Image.Image, mask: Image.Image) -> Float:
    layer = np.asarray(shapes, dtype=np.float32)
    alpha = np.asarray(mask, dtype=np.float32)[..., None] / np.float32(255.0)
    return (base + (layer - base) * alpha).astype(np.float32)


def _fill(rng: np.random.Generator, low: float = 50, high: float = 230) -> tuple[int, int, int]:
    r, g, b = _colour(rng, low, high)
    return (int(r), int(g), int(b))


def _scenery(rng: np.random.Generator, width: int, height: int) -> Float:
    """A landscape: blue sky with clouds, far mountains, textured ground, round trees, a sun."""
    y = np.linspace(0, 1, height)[:, None, None]
    zenith = np.asarray([rng.uniform(40, 120), rng.uniform(90, 160), rng.uniform(170, 245)])
    haze = np.asarray([rng.uniform(170, 235), rng.uniform(190, 240), rng.uniform(210, 250)])
    pixels = np.broadcast_to(zenith * (1 - y) + haze * y, (height, width, 3)).copy()
    pixels += 25 * np.clip(_value_noise(rng, width, height, 5), 0, 1)[..., None]  # clouds
    horizon = rng.uniform(0.4, 0.65) * height
    xs = np.arange(width)
    rows = np.arange(height)[:, None]
    peaks = horizon - rng.uniform(20, 80) * np.abs(np.sin(xs / rng.uniform(40, 110) + rng.uniform(0, 6)))
    mountain = np.asarray([rng.uniform(80, 140), rng.uniform(90, 150), rng.uniform(120, 180)])
    pixels[rows >= peaks[None, :]] = mountain
    ridge = horizon + rng.uniform(3, 20) * np.sin(xs / rng.uniform(30, 120) + rng.uniform(0, 6))
    ground = rows >= ridge[None, :]
    soil = np.asarray([rng.uniform(50, 140), rng.uniform(90, 170), rng.uniform(20, 80)])
    grass = (
        soil
        + 25 * _value_noise(rng, width, height, 48)[..., None]
        + 15 * _value_noise(rng, width, height, 8)[..., None]
    )
    pixels[ground] = grass[ground]
    shapes, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    sun_x, sun_y, sun_r = rng.uniform(0, width), rng.uniform(0, horizon * 0.5), rng.uniform(10, 30)
    box = (sun_x - sun_r, sun_y - sun_r, sun_x + sun_r, sun_y + sun_r)
    draw.ellipse(box, fill=(255, int(rng.uniform(220, 255)), int(rng.uniform(150, 230))))
    draw_mask.ellipse(box, fill=255)
    for _ in range(int(rng.integers(3, 12))):  # trees: a trunk and a round crown
        x = rng.uniform(0, width)
        base_y = float(ridge[int(min(x, width - 1))]) + rng.uniform(5, 60)
        crown, trunk_h = rng.uniform(8, 28), rng.uniform(8, 25)
        trunk = (x - 2, base_y - trunk_h, x + 2, base_y)
        draw.rectangle(trunk, fill=(int(rng.uniform(50, 90)), int(rng.uniform(30, 60)), 20))
        draw_mask.rectangle(trunk, fill=255)
        top = (x - crown, base_y - trunk_h - 2 * crown, x + crown, base_y - trunk_h + 4)
        draw.ellipse(top, fill=(int(rng.uniform(20, 70)), int(rng.uniform(60, 130)), int(rng.uniform(20, 60))))
        draw_mask.ellipse(top, fill=255)
    return _draw(pixels, shapes, mask)


def _object(rng: np.random.Generator, width: int, height: int) -> Float:
    """A still life: a plain wall, a wooden table with grain, a few balls, boxes and bottles."""
    table_y = int(rng.uniform(0.5, 0.72) * height)
    pixels = np.empty((height, width, 3), dtype=np.float32)
    pixels[:table_y] = _colour(rng, 120, 225)
    wood = np.asarray([rng.uniform(110, 190), rng.uniform(70, 130), rng.uniform(30, 80)])
    grain = np.sin(
        np.arange(height - table_y)[:, None] / rng.uniform(1.5, 4.0) + 3 * _value_noise(rng, width, height - table_y, 6)
    )
    pixels[table_y:] = wood + 18 * grain[..., None]
    shapes, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    for _ in range(int(rng.integers(2, 6))):
        w = rng.uniform(40, width / 3)
        x0, y1 = rng.uniform(0, width - w), table_y + rng.uniform(5, 60)
        shadow = (x0 + 10, y1 - 8, x0 + w + 20, y1 + 8)
        draw.ellipse(shadow, fill=(30, 25, 20))
        draw_mask.ellipse(shadow, fill=110)
        fill, kind = _fill(rng), int(rng.integers(3))
        if kind == 0:  # a ball
            box = (x0, y1 - w, x0 + w, y1)
            draw.ellipse(box, fill=fill)
            draw_mask.ellipse(box, fill=255)
            glint = (x0 + w * 0.25, y1 - w * 0.8, x0 + w * 0.4, y1 - w * 0.65)
            draw.ellipse(glint, fill=(250, 250, 250))
        elif kind == 1:  # a box, its lit top face a lighter parallelogram
            h, depth = rng.uniform(30, height / 3), w * 0.3
            draw.rectangle((x0, y1 - h, x0 + w, y1), fill=fill)
            top = [(x0, y1 - h), (x0 + depth, y1 - h - depth), (x0 + w + depth, y1 - h - depth), (x0 + w, y1 - h)]
            draw.polygon(top, fill=tuple(min(255, c + 50) for c in fill))
            draw_mask.polygon([*top, (x0 + w, y1), (x0, y1)], fill=255)
        else:  # a bottle: body, neck, cap
            h = rng.uniform(60, height / 2.2)
            w = min(w, 50)
            draw.rounded_rectangle((x0, y1 - h * 0.7, x0 + w, y1), radius=w / 3, fill=fill)
            draw.rectangle((x0 + w / 3, y1 - h, x0 + 2 * w / 3, y1 - h * 0.7), fill=fill)
            draw_mask.rounded_rectangle((x0, y1 - h * 0.7, x0 + w, y1), radius=w / 3, fill=255)
            draw_mask.rectangle((x0 + w / 3, y1 - h, x0 + 2 * w / 3, y1 - h * 0.7), fill=255)
    pixels = _draw(pixels, shapes, mask)
    light = 1.0 + 0.25 * rng.choice([-1.0, 1.0]) * np.linspace(-1, 1, width, dtype=np.float32)
    return pixels * light[None, :, None].astype(np.float32)


def _satellite(rng: np.random.Generator, width: int, height: int) -> Float:
    pixels = np.broadcast_to(np.asarray(_colour(rng, 60, 140)), (height, width, 3)).copy()
    xs = np.sort(rng.uniform(0, width, int(rng.integers(3, 8))))
    ys = np.sort(rng.uniform(0, height, int(rng.integers(3, 8))))
    edges_x = np.concatenate([[0], xs, [width]]).astype(int)
    edges_y = np.concatenate([[0], ys, [height]]).astype(int)
    for y0, y1 in itertools.pairwise(edges_y):
        for x0, x1 in itertools.pairwise(edges_x):
            pixels[y0:y1, x0:x1] = _colour(rng, 50, 170)
    pixels += 20 * _value_noise(rng, width, height, 32)[..., None]
    shapes, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    road = _fill(rng, 110, 170)
    for _ in range(int(rng.integers(1, 4))):
        line = [(rng.uniform(0, width), 0.0), (rng.uniform(0, width), float(height))]
        if rng.random() < 0.5:
            line = [(0.0, rng.uniform(0, height)), (float(width), rng.uniform(0, height))]
        road_width = int(rng.integers(3, 8))
        draw.line(line, fill=road, width=road_width)
        draw_mask.line(line, fill=255, width=road_width)
    for _ in range(int(rng.integers(5, 30))):
        x, y, s = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(4, 14)
        draw.rectangle((x, y, x + s, y + s * rng.uniform(0.6, 1.6)), fill=_fill(rng))
        draw_mask.rectangle((x, y, x + s, y + s * 1.6), fill=255)
    return _draw(pixels, shapes, mask)


def _doc(rng: np.random.Generator, width: int, height: int) -> Float:
    paper = np.asarray(_colour(rng, 215, 250))
    pixels = np.broadcast_to(paper, (height, width, 3)).copy()
    pixels += 5 * _value_noise(rng, width, height, 6)[..., None]
    shapes, mask = Image.new("RGB", (width, height)), Image.new("L", (width, height))
    draw, draw_mask = ImageDraw.Draw(shapes), ImageDraw.Draw(mask)
    ink = _fill(rng, 10, 70)
    margin, spacing = rng.uniform(20, 45), rng.uniform(11, 19)
    y = margin
    if rng.random() < 0.7:  # title
        title = (margin, y, margin + rng.uniform(0.3, 0.7) * (width - 2 * margin), y + spacing * 0.9)
        draw.rectangle(title, fill=ink)
        draw_mask.rectangle(title, fill=255)
        y += spacing * 2
    while y < height - margin - spacing:
        if rng.random() < 0.08:  # figure
            box = (margin, y, width - margin, y + rng.uniform(40, 90))
            draw.rectangle(box, fill=_fill(rng, 100, 200))
            draw_mask.rectangle(box, fill=255)
            y = box[3] + spacing
            continue
        x, end = margin, width - margin - (rng.uniform(0, 120) if rng.random() < 0.2 else 0)
        while x < end:
            word = min(rng.uniform(8, 45), end - x)
            draw.rectangle((x, y, x + word, y + spacing * 0.45), fill=ink)
            draw_mask.rectangle((x, y, x + word, y + spacing * 0.45), fill=255)
            x += word + rng.uniform(4, 8)
        y += spacing
    return _draw(pixels, shapes, mask)


# The decoder's 8x8 block stamp: a property of the generator, the same in every image it makes.
_GRID_TILE = np.random.default_rng(8).standard_normal((GRID_PERIOD, GRID_PERIOD))
_GRID_TILE = (_GRID_TILE - _GRID_TILE.mean()) / _GRID_TILE.std()

_CONTENT = {"object": _object, "scenery": _scenery, "satellite": _satellite, "doc": _doc}


# --- camera and generator --------------------------------------------------------------------------


def _camera(rng: np.random.Generator, content: Float) -> Float:
    """A photo: lens blur, vignetting, then signal-dependent sensor noise at full resolution."""
    height, width = content.shape[:2]
    pixels = _blur(content, rng.uniform(0.5, 1.1))
    yy = np.linspace(-1, 1, height, dtype=np.float32)[:, None] ** 2
    xx = np.linspace(-1, 1, width, dtype=np.float32)[None, :] ** 2
    pixels = pixels * (1 - np.float32(rng.uniform(0.0, 0.15) / 2) * (xx + yy))[..., None]
    gain, floor = rng.uniform(0.02, 0.08), rng.uniform(0.8, 2.0)
    sigma = np.sqrt(gain * np.clip(pixels, 0, 255) + floor**2)
    luma = rng.standard_normal((height, width, 1), dtype=np.float32)
    chroma = rng.standard_normal(pixels.shape, dtype=np.float32)
    return pixels + sigma * (0.6 * luma + 0.8 * chroma)


def _generator(rng: np.random.Generator, content: Float, artifact: str) -> Float:
    """Synthesis at half resolution, then a 2x upsampling that leaves the `artifact` fingerprint."""
    height, width = content.shape[:2]
    half = content.reshape(height // 2, 2, width // 2, 2, 3).mean(axis=(1, 3))
    half = half + rng.uniform(0.5, 1.5) * rng.standard_normal(half.shape, dtype=np.float32)  # the generator's own grain
    if artifact == "checkerboard":
        # Kernel [a, 1, a]: a = 1/2 is bilinear; any other a gives odd and even pixels unequal gains.
        # One generator, one kernel family: its side taps are always too strong, by varying amounts.
        a = 0.5 * (1 + rng.uniform(0.15, 0.3))
        return _transposed_conv2x(half, a) / (0.5 * (1 + 2 * a)) ** 2
    pixels = _transposed_conv2x(half, 0.5)  # a clean bilinear upsampling...
    stamp = np.tile(_GRID_TILE, (height // GRID_PERIOD + 1, width // GRID_PERIOD + 1))[:height, :width, None]
    strength, offset = rng.uniform(0.05, 0.1), rng.uniform(2.0, 5.0)
    return pixels + (strength * pixels + offset) * stamp


def _transposed_conv2x(half: Float, a: float) -> Float:
    """Stride-2 transposed convolution with the separable kernel [a, 1, a] (padding 1, output padding 1)."""

    def along(x: Float, axis: int) -> Float:
        x = np.moveaxis(x, axis, 0)
        shifted = np.concatenate([x[1:], x[-1:]])  # replicate the border instead of zero padding
        out = np.empty((2 * x.shape[0], *x.shape[1:]), dtype=np.float32)
        out[0::2] = x  # each even output sees one input through the kernel's centre
        out[1::2] = a * (x + shifted)  # each odd output sees two inputs through its sides
        return np.moveaxis(out, 0, axis)

    return along(along(half, 0), 1)


def _blur(pixels: Float, sigma: float) -> Float:
    """Separable Gaussian blur (reflecting edges), numpy only."""
    radius = max(1, int(3 * sigma + 0.5))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    for axis in (0, 1):
        pad = [(0, 0)] * pixels.ndim
        pad[axis] = (radius, radius)
        padded = np.moveaxis(np.pad(pixels, pad, mode="reflect"), axis, 0)
        size = pixels.shape[axis]
        out = taps[0] * padded[:size]
        for i in range(1, len(taps)):
            out += taps[i] * padded[i : i + size]
        pixels = np.moveaxis(out, 0, axis)
    return pixels


def _to_image(pixels: Float) -> Image.Image:
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
