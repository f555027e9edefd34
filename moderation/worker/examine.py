"""What the decode threads learn from an image's bytes: FakeVLM's input (a crop for each frame judged), the
image's size, format, frames and PDQ hash, and the file's provenance claims. CPU-bound: run in the worker's
decode pool (or inline for tiny still images), within its byte budget for decoded pixels."""

from __future__ import annotations

from dataclasses import dataclass

from moderation.events import ImageInfo, Provenance
from moderation.model.frames import STILL, Frame, FrameLimits, FramePlan, frames_decode_bytes, plan, sample
from moderation.model.imaging import DEFAULT_FORMATS, Header, prepare_header, read_header
from moderation.worker.budget import ByteBudget
from moderation.worker.neardup import pdq_of
from moderation.worker.provenance import read_provenance

PREVIEW_PX = 512  # PDQ is computed on the image shrunk to this (its own first step shrinks further)


@dataclass(frozen=True)
class Examined:
    frames: tuple[Frame, ...]  # FakeVLM's crops of the frames judged, by index (one for a still image)
    image: ImageInfo  # with its PDQ hash when asked for
    provenance: Provenance | None


def examine(
    data: bytes | Header,
    max_pixels: int,
    *,
    budget: ByteBudget | None = None,
    fast: bool = False,
    formats: tuple[str, ...] = DEFAULT_FORMATS,
    hashing: bool = True,
    frames: FrameLimits = STILL,
) -> Examined:
    """Read the header, plan the frames to judge, then decode once their pixels fit in `budget` (None:
    unbounded). A Header is the object's header read already (by the event loop, to choose where to decode
    it): not read twice."""
    header = data if isinstance(data, Header) else read_header(data, max_pixels=max_pixels, formats=formats)
    try:
        frame_plan = plan(header, frames, max_pixels)
        if budget is None:
            return examine_header(header, frame_plan, fast=fast, hashing=hashing)
        with budget.reserve(frames_decode_bytes(header, frame_plan)):
            try:
                return examine_header(header, frame_plan, fast=fast, hashing=hashing)
            finally:
                header.image.close()  # its pixels go before the budget is given back
    finally:
        header.image.close()


def examine_header(header: Header, frame_plan: FramePlan, *, fast: bool = False, hashing: bool = True) -> Examined:
    preview = PREVIEW_PX if hashing else 0
    judged: tuple[Frame, ...]
    if frame_plan.still:  # the single-image path, fast JPEG decoding and all
        prepared = prepare_header(header, fast=fast, preview=preview)
        judged, small = (Frame(0, prepared.pixels),), prepared.preview
    else:
        sampled = sample(header, frame_plan, preview=preview)
        judged, small = sampled.frames, sampled.preview
    pdq, quality = pdq_of(small) if small is not None else (None, None)
    image = ImageInfo(
        width=header.width,
        height=header.height,
        format=header.format,
        pdq=pdq,
        pdq_quality=quality,
        frames=frame_plan.total,
        frames_judged=[frame.index for frame in judged],
    )
    return Examined(judged, image, read_provenance(header.data, header.format))
