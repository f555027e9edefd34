"""Sample uploads for the demo and the tests: procedurally drawn images (no downloads) and bad events,
each bad event with the dead-letter reason it must produce."""

from __future__ import annotations

import io
import json
import math
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from moderation.errors import Reason

FORMATS = (("JPEG", ".jpg"), ("PNG", ".png"), ("WEBP", ".webp"), ("GIF", ".gif"))


def draw_image(seed: int, size: tuple[int, int] = (640, 480)) -> Image.Image:
    """A photo-ish picture: a sky gradient, a horizon, a few shapes and sensor-like noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    y = np.linspace(0, 1, height)[:, None, None]
    top, bottom = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    pixels: np.ndarray = np.broadcast_to(top * (1 - y) + bottom * y, (height, width, 3)).astype(np.float64)
    pixels += rng.normal(0, 6, pixels.shape)
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(10, min(size) / 3)
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        else:
            angle = rng.uniform(0, math.pi)
            draw.line((x0, y0, x0 + r * math.cos(angle), y0 + r * math.sin(angle)), fill=colour, width=5)
    return image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0, 1.5))))


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **({"quality": 90} if fmt in ("JPEG", "WEBP") else {}))
    return buffer.getvalue()


def write_samples(directory: Path, count: int, *, seed: int = 0) -> list[Path]:
    """`count` images in rotating formats and sizes, written to `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        fmt, suffix = FORMATS[i % len(FORMATS)]
        size = (640, 480) if i % 3 else (480, 720)
        path = directory / f"sample-{i:03d}{suffix}"
        path.write_bytes(encode(draw_image(seed + i, size), fmt))
        paths.append(path)
    return paths


@dataclass(frozen=True)
class BadUpload:
    """A message that must end as a dead letter with `reason`; `objects` are put in S3 first."""

    name: str
    reason: Reason
    value: bytes
    event_id: str | None
    objects: dict[str, bytes]

    @property
    def message(self) -> tuple[bytes | None, bytes]:
        return (self.event_id.encode() if self.event_id else None), self.value


def bad_uploads(bucket: str, *, forbidden_bucket: str = "not-allowed-bucket") -> list[BadUpload]:
    """One of each kind of bad upload the worker must dead-letter, each with a fresh event_id."""
    uid = uuid.uuid4().hex[:12]
    jpeg = encode(draw_image(7), "JPEG")

    def event(name: str, key: str, extra: Mapping[str, object]) -> tuple[str, bytes]:
        event_id = f"bad-{name}-{uid}"
        body: dict[str, object] = {"schema_version": 1, "event_id": event_id, "bucket": bucket, "key": key}
        body.update(extra)
        return event_id, json.dumps(body).encode()

    cases = []
    for name, reason, key, objects, extra in (
        ("missing-object", Reason.OBJECT_MISSING, f"bad/{uid}/missing.jpg", {}, {}),
        (
            "not-an-image",
            Reason.INVALID_IMAGE,
            f"bad/{uid}/notes.jpg",
            {"notes.jpg": b"just some text\n" * 20},
            {},
        ),
        (
            "truncated-jpeg",
            Reason.INVALID_IMAGE,
            f"bad/{uid}/cut.jpg",
            {"cut.jpg": jpeg[: len(jpeg) // 3]},
            {},
        ),
        ("empty-object", Reason.EMPTY_OBJECT, f"bad/{uid}/empty.png", {"empty.png": b""}, {}),
        ("forbidden-bucket", Reason.FORBIDDEN_BUCKET, f"bad/{uid}/x.jpg", {}, {"bucket": forbidden_bucket}),
        (
            "checksum-mismatch",
            Reason.CHECKSUM_MISMATCH,
            f"bad/{uid}/sum.jpg",
            {"sum.jpg": jpeg},
            {"sha256": "0" * 64},
        ),
        ("unknown-schema", Reason.UNSUPPORTED_SCHEMA, f"bad/{uid}/v9.jpg", {}, {"schema_version": 9}),
        ("missing-field", Reason.INVALID_EVENT, "", {}, {"key": None}),
    ):
        event_id, value = event(name, key, extra)
        stored = {f"bad/{uid}/{leaf}": data for leaf, data in objects.items()}
        cases.append(BadUpload(name, reason, value, event_id, stored))
    cases.append(BadUpload("not-json", Reason.INVALID_EVENT, b'{"schema_version": 1, "event_id": ', None, {}))
    return cases
