"""Which frames of an animated or multi-page image are judged, and their crops, with the work bounded.

A generated picture can hide behind a real first frame of a GIF, an APNG, an animated WebP or a multi-page TIFF.
Up to `FrameLimits.judged` frames are judged: the first and the last reachable, evenly between and, where
reaching them decodes the frames between anyway, the biggest scene changes among those (the frames that differ
most from the one before: a single generated frame spliced into a clip is one).

What a file costs:
- GIF, APNG and WebP frames are drawn over the frames before them, so Pillow (libwebp for WebP) reaches frame k
  by decoding frames 0..k: frame 999 of a 1,000-frame 336x336 GIF costs 1,000 decodes, 0.9 s (measured, README).
  Those formats are judged within their first `decodes` frames (MODERATION_MAX_FRAME_DECODES), so a file of any
  length costs at most that many decodes; `ImageInfo.frames` says how many the file holds, `frames_judged`
  which were judged.
- TIFF and MPO pages decode alone: a page judged is one decode, pages spread over the first `decodes`.
- Every frame decoded counts against MODERATION_MAX_IMAGE_PIXELS as one image's pixels do, so an animation
  costs at most the pixels of the largest still image allowed; a 50 MP animated GIF is judged on its first frame.
- Memory: `decode_bytes` bounds what the walk holds at once (Pillow's canvas, the previous canvas it keeps to
  dispose of a frame, the frame's RGB copy, and the crops kept), reserved from the decode budget as one image.
- A frame that fails to decode ends the walk: the frames before it are judged (as the first frame alone was,
  before frames were judged); a first frame that fails is the image's `invalid_image`, as it was.
A still image, or a tenant judging one frame, goes the single-image path of `moderation.model.imaging`
unchanged.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np
from PIL import Image

from moderation.errors import Reason, Rejected
from moderation.model import structure
from moderation.model.imaging import CROP_SIZE, DECODE_SLACK, Header, crop, decode_bytes, preview_of, to_rgb

# Pages that decode alone; every other multi-frame format is read as GIF is: frame k after frames 0..k-1.
RANDOM_ACCESS = frozenset({"TIFF", "MPO"})
# Bytes a canvas pixel while an animation is walked: Pillow's canvas (4), the previous canvas it keeps for
# disposal (4), the region it restores (up to 4), the frame as decoded (a palette index: 1) and its RGB copy
# for the crop (4). A page of TIFF or MPO: its own buffer (up to 4), an 8-bit copy of a wide page (1), RGB (4).
_CANVAS_BYTES = 17
_PAGE_BYTES = 9
_CROP_BYTES = CROP_SIZE * CROP_SIZE * 3
_THUMB = (32, 32)  # a frame shrunk to this is compared with the one before for scene changes


@dataclass(frozen=True)
class FrameLimits:
    """How many frames to judge, and how many frames may be decoded to reach them."""

    judged: int = 1
    decodes: int = 1
    at: int | None = None  # this one frame alone (the explainer's: the frame its verdict names)


STILL = FrameLimits()  # the first frame only
CAPS = FrameLimits(judged=16, decodes=128)  # the settings' defaults: MODERATION_MAX_FRAMES, _MAX_FRAME_DECODES


@dataclass(frozen=True)
class FramePlan:
    total: int  # frames in the file, counted no further than FrameLimits.decodes + 1
    indices: tuple[int, ...]  # judged whatever the pixels show, ascending
    scene_changes: int = 0  # frames more, picked on the way by how much they change (sequential formats)
    frame_pixels: int = 0  # the largest frame's pixels
    sequential: bool = True  # frame k is decoded after frames 0..k-1

    @property
    def still(self) -> bool:
        """Only the first frame: the single-image path, as for a still image."""
        return self.indices == (0,) and not self.scene_changes

    @property
    def decodes(self) -> int:
        """Frames this plan decodes."""
        return self.indices[-1] + 1 if self.sequential else len(self.indices)


@dataclass(frozen=True)
class Frame:
    index: int  # 0-based, in the file's order
    pixels: np.ndarray  # FakeVLM's uint8 crop (336, 336, 3)


@dataclass(frozen=True)
class Sampled:
    frames: tuple[Frame, ...]  # ascending by index
    preview: Image.Image | None  # the first frame's, when asked for
    decodes: int  # frames decoded


def animated(header: Header) -> bool:
    """Whether the file has more than one frame, from its first frame's blocks at most."""
    return bool(getattr(header.image, "is_animated", False))


def plan(header: Header, limits: FrameLimits, max_pixels: int) -> FramePlan:
    """The frames to judge, from the header and the frame count alone: no pixel decoded (a TIFF page's
    directory is read for its size)."""
    if limits == STILL:
        return FramePlan(total=1, indices=(0,), frame_pixels=header.pixels)
    try:
        several = animated(header)
        total = _count(header, limits.decodes + 1) if several else 1
        if several and header.format in RANDOM_ACCESS:
            return _pages(header, total, limits, max_pixels)
    except Rejected:
        raise
    except Exception as exc:  # Pillow raises many types on a hostile frame table
        raise Rejected(Reason.INVALID_IMAGE, f"unreadable {header.format} frame table: {exc}") from exc
    reach = min(total, limits.decodes, max(1, max_pixels // header.pixels))
    if limits.at is not None:
        return FramePlan(total, (_reachable(limits.at, reach, header),), frame_pixels=header.pixels)
    if limits.judged >= reach:
        return FramePlan(total, tuple(range(reach)), frame_pixels=header.pixels)
    # Half the frames evenly (at least the first and the last), the other half by scene change.
    even = _evenly(reach, min(limits.judged, max(2, limits.judged - limits.judged // 2)))
    return FramePlan(total, even, limits.judged - len(even), header.pixels)


def frames_decode_bytes(header: Header, frame_plan: FramePlan) -> int:
    """An upper bound on the pixel memory sampling these frames holds at its peak (`decode_bytes` when still)."""
    if frame_plan.still:
        return decode_bytes(header)
    per_pixel = _CANVAS_BYTES if frame_plan.sequential else _PAGE_BYTES
    crops = (len(frame_plan.indices) + frame_plan.scene_changes) * _CROP_BYTES
    return frame_plan.frame_pixels * per_pixel + crops + DECODE_SLACK


def sample(header: Header, frame_plan: FramePlan, *, preview: int = 0) -> Sampled:
    """Decode the plan's frames (and, on the way, its scene changes) into crops. `preview` > 0: also the
    first frame as a small RGB image (its PDQ hash), when the first frame is judged."""
    if frame_plan.sequential:
        return _walk(header, frame_plan, preview)
    return _pages_sampled(header, frame_plan, preview)


def _walk(header: Header, frame_plan: FramePlan, preview: int) -> Sampled:
    image, wanted, room = header.image, set(frame_plan.indices), frame_plan.scene_changes
    crops: dict[int, np.ndarray] = {}
    scenes: list[tuple[float, int, np.ndarray]] = []  # a min-heap: the biggest changes seen so far
    previous: np.ndarray | None = None
    small: Image.Image | None = None
    decodes = 0
    for index in range(frame_plan.decodes):
        if not _loaded(image, index, header.format):
            break
        decodes += 1
        thumb = _thumb(image) if room else None
        change = float(np.abs(thumb - previous).mean()) if thumb is not None and previous is not None else 0.0
        previous = thumb
        if index in wanted:
            rgb = to_rgb(image)
            crops[index] = crop(rgb)
            small = _own_preview(rgb, image, preview) if index == 0 and preview > 0 else small
        elif room and index and (len(scenes) < room or change > scenes[0][0]):
            scene = (change, index, crop(to_rgb(image)))
            if len(scenes) < room:
                heapq.heappush(scenes, scene)
            else:
                heapq.heapreplace(scenes, scene)
    crops.update((index, pixels) for _, index, pixels in scenes)
    return Sampled(_ordered(crops), small, decodes)


def _pages_sampled(header: Header, frame_plan: FramePlan, preview: int) -> Sampled:
    image = header.image
    crops: dict[int, np.ndarray] = {}
    small: Image.Image | None = None
    for index in frame_plan.indices:
        if not _loaded(image, index, header.format):
            break
        rgb = to_rgb(image)
        if index == 0 and preview > 0:
            small = _own_preview(rgb, image, preview)
        crops[index] = crop(rgb)
    return Sampled(_ordered(crops), small, len(crops))


def _loaded(image: Image.Image, index: int, fmt: str) -> bool:
    """Frame `index` decoded into Pillow's image (read it before the next seek); False when it cannot be and
    it is not the first: the first's failure is the image's."""
    try:
        image.seek(index)
        image.load()
        return True
    except Exception as exc:
        if index == 0:
            raise Rejected(Reason.INVALID_IMAGE, f"corrupt or truncated {fmt} image: {exc}") from exc
        return False


def _own_preview(rgb: Image.Image, image: Image.Image, size: int) -> Image.Image:
    """The first frame shrunk for hashing, never Pillow's own image (the next frame overwrites that)."""
    small = preview_of(rgb, size)
    return small.copy() if small is image else small


def _thumb(image: Image.Image) -> np.ndarray:
    """The frame shrunk in its own mode, then made RGB: only compared, so no whole-frame conversion."""
    return np.asarray(image.resize(_THUMB, Image.Resampling.BOX).convert("RGB"), dtype=np.int16)


def _ordered(crops: dict[int, np.ndarray]) -> tuple[Frame, ...]:
    return tuple(Frame(index, crops[index]) for index in sorted(crops))


def _evenly(reach: int, count: int) -> tuple[int, ...]:
    """`count` frames of 0..reach-1, the first and the last among them, evenly between."""
    if count >= reach:
        return tuple(range(reach))
    if count <= 1:
        return (0,)
    return tuple(sorted({round(i * (reach - 1) / (count - 1)) for i in range(count)}))


def _reachable(index: int, reach: int, header: Header) -> int:
    if not 0 <= index < reach:
        detail = f"frame {index} of this {header.format} is beyond the {reach} frames that may be decoded"
        raise Rejected(Reason.INVALID_IMAGE, detail)
    return index


def _count(header: Header, limit: int) -> int:
    """The file's frames, counted no further than `limit`: never Pillow's `n_frames` for GIF or TIFF, which
    walks every frame (or every page directory) in Python however many there are."""
    image = header.image
    if header.format == "GIF":
        return max(1, structure.gif_frames(header.data, limit))
    if header.format == "TIFF":
        pages = 1
        while pages < limit:
            try:
                image.seek(pages)  # reads the page's directory, decodes nothing
            except Exception:  # EOFError past the last page; a broken directory ends the count as well
                break
            pages += 1
        image.seek(0)
        return pages
    return max(1, min(int(getattr(image, "n_frames", 1)), limit))  # declared in the header (APNG, WebP, MPO)


def _pages(header: Header, total: int, limits: FrameLimits, max_pixels: int) -> FramePlan:
    """The pages to judge, each within the pixels left: a page too large (a later page may be a decompression
    bomb whatever the first says) or unreadable is not judged."""
    image = header.image
    candidates = (limits.at,) if limits.at is not None else _evenly(min(total, limits.decodes), limits.judged)
    chosen: list[int] = []
    pixels = largest = 0
    for index in candidates:
        try:
            image.seek(index)  # the page's directory only
        except Exception:  # past the last page, or a broken directory: the pages before it are judged
            break
        width, height = image.size
        if 0 < width * height <= max_pixels - pixels:
            chosen.append(index)
            pixels += width * height
            largest = max(largest, width * height)
    image.seek(0)
    if not chosen:
        raise Rejected(Reason.INVALID_IMAGE, f"no page of this {header.format} may be decoded within the pixel cap")
    return FramePlan(total, tuple(chosen), frame_pixels=largest, sequential=False)
