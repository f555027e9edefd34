"""Every frame that matters is judged: an animated or multi-page image's frames are sampled within bounded
decodes and pixels, the verdict takes the frame with the highest P(fake) and names it, and its explanation is
of that frame; a still image is judged exactly as before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageFile, TiffImagePlugin

from moderation.client import event_message, publish, read_explanations, read_outcomes, upload_images
from moderation.devkit import animations, hostile_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import open_lane
from moderation.devkit.samples import draw_image, encode
from moderation.devkit.training import trained_checkpoint
from moderation.model import structure
from moderation.model.fakevlm import FakeVLM
from moderation.model.frames import STILL, FrameLimits, plan
from moderation.model.imaging import prepare_header, read_header
from moderation.worker.examine import examine

CAP = 50_000_000
JUDGED = FrameLimits(judged=8, decodes=128)
FAKE_AT = 5  # of 8 frames: neither the first nor the last, and off the even spacing of 4 frames in 8


@pytest.fixture(scope="module")
def trained() -> FakeVLM:
    return FakeVLM.load(trained_checkpoint())


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Pillow's frame decodes, counted where every plugin's pixels are read (a load with tiles to decode, or
    libtiff's); WebP frames are decoded by libwebp on `load`, so its loads count them as well."""
    count = [0]
    plain, libtiff = ImageFile.ImageFile.load, TiffImagePlugin.TiffImageFile._load_libtiff

    def counting(self: ImageFile.ImageFile):  # type: ignore[no-untyped-def]
        count[0] += bool(self.tile)
        return plain(self)

    def counting_libtiff(self: TiffImagePlugin.TiffImageFile):  # type: ignore[no-untyped-def]
        count[0] += 1
        return libtiff(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_load_libtiff", counting_libtiff)
    yield count


def score(vlm: FakeVLM, data: bytes, frames: FrameLimits = JUDGED) -> tuple[list[int], list[float]]:
    examined = examine(data, CAP, frames=frames)
    scored = vlm.score(np.stack([f.pixels for f in examined.frames]), [2.0] * len(examined.frames))
    return examined.image.frames_judged, [s.score for s in scored]


def test_the_pictures_are_what_the_trained_model_says(trained: FakeVLM) -> None:
    real = [s.image for s in animations.pictures(8, "real")]
    fake = animations.pictures(1, "fake")[0].image
    alone = trained.score(np.stack([np.asarray(p) for p in [*real, fake]]), [2.0] * 9)
    assert all(s.score < 0.1 for s in alone[:8]) and alone[8].score > 0.9


@pytest.mark.parametrize("fmt", animations.ANIMATED_FORMATS)
def test_a_fake_frame_behind_a_real_first_frame_is_the_verdicts(fmt: str, trained: FakeVLM) -> None:
    data = animations.spliced(fmt, 8, FAKE_AT)
    judged, scores = score(trained, data)
    assert judged == list(range(8))  # 8 frames, 8 judged
    assert judged[int(np.argmax(scores))] == FAKE_AT and max(scores) > 0.9
    first_only, first_score = score(trained, data, STILL)  # what the worker judged before
    assert first_only == [0] and first_score[0] < 0.1


@pytest.mark.parametrize("fmt", animations.ANIMATED_FORMATS)
def test_a_single_changed_frame_in_a_long_animation_is_found_by_scene_change(fmt: str, trained: FakeVLM) -> None:
    # 40 frames of a real picture panning a pixel a frame but frame 23, judged 6: 3 evenly (0, 20, 39), 3 by
    # scene change (encoders merge identical frames: the pan keeps them apart)
    real = animations.pictures(1, "real")[0].image
    fake = animations.pictures(1, "fake")[0].image
    data = animations.animation([fake if i == 23 else ImageChops.offset(real, i, 0) for i in range(40)], fmt)
    judged, scores = score(trained, data, FrameLimits(judged=6, decodes=128))
    assert len(judged) == 6 and {0, 39} <= set(judged)
    assert judged[int(np.argmax(scores))] == 23


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"])
def test_a_still_image_gets_the_same_crop_as_before(fmt: str) -> None:
    data = encode(draw_image(3, (500, 400)), fmt)
    before = prepare_header(read_header(data, max_pixels=CAP)).pixels
    examined = examine(data, CAP, frames=JUDGED)
    assert examined.image.frames == 1 and examined.image.frames_judged == [0]
    [frame] = examined.frames
    assert np.array_equal(frame.pixels, before)


def test_a_thousand_frame_gif_costs_at_most_the_decode_cap(decodes: list[int]) -> None:
    data = animations.flat((200, 150), 1000)
    examined = examine(data, CAP, frames=FrameLimits(judged=8, decodes=64))
    assert 0 < decodes[0] <= 64
    assert examined.image.frames == 65  # counted no further than the cap + 1: "more than 64"
    assert examined.image.frames_judged[0] == 0 and examined.image.frames_judged[-1] == 63
    assert structure.gif_frames(data, 10**6) == 1000


def test_the_explainers_frame_is_the_crop_that_was_judged(decodes: list[int]) -> None:
    data = animations.spliced("GIF", 8, FAKE_AT)
    walked = {f.index: f.pixels for f in examine(data, CAP, frames=JUDGED).frames}
    decodes[0] = 0
    [alone] = examine(data, CAP, frames=FrameLimits(decodes=128, at=FAKE_AT), hashing=False).frames
    assert alone.index == FAKE_AT and np.array_equal(alone.pixels, walked[FAKE_AT])
    assert decodes[0] == FAKE_AT + 1  # frames 0..5: each drawn over the one before


def test_frames_count_against_the_pixel_cap(decodes: list[int]) -> None:
    data = animations.flat((1000, 1000), 10)
    examined = examine(data, 3_000_000, frames=JUDGED)
    assert examined.image.frames == 10 and examined.image.frames_judged == [0, 1, 2]
    assert decodes[0] == 3
    # An animation whose frame is more than half the cap is judged on its first frame alone, by the
    # single-image path (a 50 MP animated GIF, with the default cap)
    assert plan(read_header(data, max_pixels=CAP), JUDGED, 1_500_000).still


def test_a_later_tiff_page_over_the_pixel_cap_is_not_judged(decodes: list[int]) -> None:
    pages = [Image.new("RGB", (300, 200), (i * 40, 0, 0)) for i in range(4)]
    pages[2] = Image.new("L", (3000, 3000))  # 9 MP: a bomb after a small first page
    data = hostile_images.save(pages[0], "TIFF", save_all=True, append_images=pages[1:], compression="tiff_deflate")
    examined = examine(data, 1_000_000, frames=JUDGED)
    assert examined.image.frames == 4 and examined.image.frames_judged == [0, 1, 3]
    assert decodes[0] == 3  # pages decode alone


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])  # libwebp opens no truncated WebP: invalid_image, as before
def test_a_truncated_animation_is_judged_on_the_frames_before_the_cut(fmt: str) -> None:
    data = animations.animation([s.image for s in animations.pictures(4, "real")], fmt)
    examined = examine(data[: len(data) * 3 // 5], CAP, frames=JUDGED)
    assert examined.image.frames_judged[0] == 0 and len(examined.image.frames_judged) < 4


def test_a_policy_of_one_frame_is_the_first_frame_alone() -> None:
    data = animations.animation([s.image for s in animations.pictures(3, "real")], "GIF")
    examined = examine(data, CAP, frames=FrameLimits(judged=1, decodes=128))
    assert examined.image.frames == 3 and examined.image.frames_judged == [0]


def test_a_gif_frame_count_stops_at_its_limit_and_at_garbage() -> None:
    data = animations.flat((4, 4), 300)
    assert structure.gif_frames(data, 10) == 10 and structure.gif_frames(data, 1000) == 300
    assert structure.gif_frames(data[:40], 1000) <= 1 and structure.gif_frames(b"GIF89a", 5) == 0


@pytest.mark.integration
@pytest.mark.slow
def test_a_worker_flags_the_fake_frame_and_its_explanation_is_of_that_frame(make_stack, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The worker as deployed, with the trained tiny FakeVLM in process (no Triton), on the local Kafka and S3."""
    lane = open_lane(make_stack(triton=False), tmp_path)
    files = {f"spliced.{fmt.lower()}": animations.spliced(fmt, 8, FAKE_AT) for fmt in animations.ANIMATED_FORMATS}
    still = animations.pictures(1, "real")[0].image
    files["still.png"] = encode(still, "PNG")
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    settings = lane.settings
    events = asyncio.run(upload_images(settings, [tmp_path / n for n in files], bucket=settings.s3_allowed_buckets[0]))
    by_name = {Path(e.key).name: e.event_id for e in events}
    model = {"MODERATION_DETECTOR": "inprocess", "MODERATION_CHECKPOINT": str(trained_checkpoint())}
    worker, explainer = lane.worker(**model), lane.explainer(**model)
    try:
        asyncio.run(publish(settings, [event_message(e) for e in events]))
        outcomes = asyncio.run(read_outcomes(settings, set(by_name.values()), timeout_s=300))
        flagged = {by_name[n] for n in by_name if n != "still.png"}
        explained, failed = asyncio.run(read_explanations(settings, flagged, timeout_s=300))
    finally:
        stop_worker(worker)
        stop_worker(explainer)
    assert not outcomes.dead_letters and not failed, (outcomes.dead_letters, failed)
    verdicts = {event_id: found[-1] for event_id, found in outcomes.verdicts.items()}
    for event_id in flagged:
        verdict = verdicts[event_id]
        assert (verdict.label, verdict.action, verdict.frame) == ("fake", "flag", FAKE_AT), verdict
        assert verdict.image.frames == 8 and verdict.image.frames_judged == list(range(8))
        assert verdict.explanation_requested
        explanation = explained[event_id]
        assert explanation.frame == FAKE_AT and explanation.explanation.startswith("This is a fake image.")
    plain = verdicts[by_name["still.png"]]
    assert (plain.label, plain.action, plain.frame, plain.image.frames) == ("real", "allow", None, 1)
