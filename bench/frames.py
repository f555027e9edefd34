"""What judging the frames of an animated image costs, per extra frame, against judging its first frame alone.

- examine: `moderation.worker.examine.examine` of an 8-frame 336x336 GIF, APNG and lossless WebP (real
  synthetic pictures) judging 8 frames against judging 1 (the baseline, the worker's path before frames were
  judged), measured interleaved in the same run; per extra frame = (8-frame time - 1-frame time) / 7.
- score: the trained tiny FakeVLM's verdict pass (`FakeVLM.score`, no explanation) on 8 crops in one batch
  against 1, on this machine's CPU; per extra frame likewise. (On a GPU with the real 7B weights each frame is
  one more row of the verdict batch: see README Performance for a row's cost.)
- seek: decoding frame k of a 1,000-frame 336x336 GIF from a fresh open (Pillow decodes frames 0..k), and the
  decodes `examine` makes on it with the default caps.
- still: a 1024x768 JPEG through `examine` with the default caps against the first-frame-only limits: the
  still-image path must not change (ratio ~1).
Each figure is the median of --repeat runs. The last line is a JSON summary.

    python bench/frames.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageFile
from provenance import median_ms  # a sibling script, not a package

from moderation.devkit import animations
from moderation.devkit.samples import draw_image, encode
from moderation.devkit.training import trained_checkpoint
from moderation.model.fakevlm import FakeVLM
from moderation.model.frames import CAPS, STILL, FrameLimits
from moderation.worker.examine import examine

CAP = 50_000_000
FRAMES = 8
EIGHT = FrameLimits(judged=FRAMES, decodes=CAPS.decodes)


def paired(one: Callable[[], object], many: Callable[[], object], repeat: int) -> tuple[float, float]:
    """Both medians, measured interleaved, each going first in turn, so that the machine's load and the
    caches favour neither."""
    ones, manys = [], []
    for turn in range(repeat):
        for fn, into in ((one, ones), (many, manys))[:: 1 if turn % 2 else -1]:
            into.append(median_ms(fn, 1))
    return statistics.median(ones), statistics.median(manys)


def decodes_of(fn: Callable[[], object]) -> int:
    count = [0]
    original = ImageFile.ImageFile.load

    def counting(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        count[0] += bool(self.tile)
        return original(self)

    ImageFile.ImageFile.load = counting  # type: ignore[method-assign]
    try:
        fn()
    finally:
        ImageFile.ImageFile.load = original  # type: ignore[method-assign]
    return count[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    summary: dict[str, object] = {"machine": platform.processor() or platform.machine(), "repeat": args.repeat}
    print(f"frames judged {FRAMES} against 1; median of {args.repeat}; {summary['machine']}")

    real = [s.image for s in animations.pictures(FRAMES, "real")]
    for fmt in animations.ANIMATED_FORMATS:
        data = animations.animation(real, fmt)
        one, many = paired(
            lambda data=data: examine(data, CAP, frames=STILL),
            lambda data=data: examine(data, CAP, frames=EIGHT),
            args.repeat,
        )
        extra = (many - one) / (FRAMES - 1)
        print(f"examine {fmt:5s} 1 frame {one:6.2f} ms, {FRAMES} frames {many:6.2f} ms: {extra:5.2f} ms an extra frame")
        summary[f"examine_{fmt.lower()}_extra_frame_ms"] = round(extra, 2)

    vlm = FakeVLM.load(trained_checkpoint())
    crops = np.stack([np.asarray(p) for p in real])
    vlm.score(crops[:1], [2.0])  # warm-up
    one, many = paired(lambda: vlm.score(crops[:1], [2.0]), lambda: vlm.score(crops, [2.0] * FRAMES), args.repeat)
    extra = (many - one) / (FRAMES - 1)
    print(f"score (tiny FakeVLM, CPU) 1 crop {one:6.2f} ms, {FRAMES} crops {many:6.2f} ms: {extra:5.2f} ms a frame")
    summary["score_extra_frame_ms"] = round(extra, 2)

    long_gif = animations.animation([real[i % FRAMES] for i in range(1000)], "GIF", duration=40)
    for k in (1, 127, 999):

        def seek(k: int = k) -> None:
            image = Image.open(io.BytesIO(long_gif))
            image.seek(k)
            image.load()

        took = median_ms(seek, max(1, args.repeat // 3) if k == 999 else args.repeat)
        print(f"seek frame {k:4d} of a 1,000-frame GIF: {took:8.1f} ms ({decodes_of(seek)} decodes)")
        summary[f"gif_seek_{k}_ms"] = round(took, 1)
    walked = decodes_of(lambda: examine(long_gif, CAP, frames=EIGHT))
    took = median_ms(lambda: examine(long_gif, CAP, frames=EIGHT), max(1, args.repeat // 3))
    print(f"examine the 1,000-frame GIF, {FRAMES} judged, caps {CAPS.decodes} decodes: {took:.1f} ms, {walked} decodes")
    summary |= {"gif_1000_examine_ms": round(took, 1), "gif_1000_decodes": walked}

    jpeg = encode(draw_image(2, (1024, 768)), "JPEG")
    one, many = paired(
        lambda: examine(jpeg, CAP, frames=STILL), lambda: examine(jpeg, CAP, frames=CAPS), args.repeat * 3
    )
    print(f"still JPEG 1024x768: first-frame limits {one:.2f} ms, default caps {many:.2f} ms, ratio {many / one:.2f}")
    summary["still_jpeg_ratio"] = round(many / one, 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
