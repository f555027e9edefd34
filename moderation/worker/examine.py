"""What the decode threads learn from an image's bytes: FakeVLM's input, the image's size, format and PDQ
hash, and the file's provenance claims. CPU-bound: run in the worker's decode pool (or inline for tiny
images), within its byte budget for decoded pixels."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np

from moderation.events import ImageInfo, Provenance
from moderation.model.imaging import DEFAULT_FORMATS, Header, decode_bytes, prepare_header, read_header
from moderation.worker.budget import ByteBudget
from moderation.worker.neardup import pdq_of
from moderation.worker.provenance import read_provenance

PREVIEW_PX = 512  # PDQ is computed on the image shrunk to this (its own first step shrinks further)


@dataclass(frozen=True)
class Examined:
    pixels: np.ndarray  # FakeVLM's pixel_values
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
) -> Examined:
    """Read the header, then decode once the image's pixels fit in `budget` (None: unbounded). A Header is
    the object's header read already (by the event loop, to choose where to decode it): not read twice."""
    header = data if isinstance(data, Header) else read_header(data, max_pixels=max_pixels, formats=formats)
    reserved = budget.reserve(decode_bytes(header)) if budget is not None else contextlib.nullcontext()
    with reserved:
        try:
            return examine_header(header, fast=fast, hashing=hashing)
        finally:
            header.image.close()  # its pixels go before the budget is given back


def examine_header(header: Header, *, fast: bool = False, hashing: bool = True) -> Examined:
    prepared = prepare_header(header, fast=fast, preview=PREVIEW_PX if hashing else 0)
    pdq, quality = pdq_of(prepared.preview) if prepared.preview is not None else (None, None)
    image = ImageInfo(
        width=prepared.width, height=prepared.height, format=prepared.format, pdq=pdq, pdq_quality=quality
    )
    return Examined(prepared.pixels, image, read_provenance(header.data, header.format))
