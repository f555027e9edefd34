"""Near-duplicate matching: PDQ hashes survive re-encoding, resizing and light crops of a confirmed fake and
never pair unrelated demo or Pillow-style images; the bank prefers reviewed decisions, refuses forged
records and follows its compacted topic on the real broker."""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pdqhash
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from moderation.devkit import localstack
from moderation.devkit.demo import DEMO_SEED
from moderation.devkit.samples import draw_image, write_samples
from moderation.devkit.synthetic import make_sample, write_images
from moderation.events import BankEntry
from moderation.worker import metrics, neardup
from moderation.worker.neardup import (
    DEFAULT_MAX_DISTANCE,
    HashBank,
    Refusal,
    crop_hashes,
    dihedral_hashes,
    hamming,
    pdq_of,
)

NOW = datetime(2026, 11, 29, tzinfo=UTC)


def jpeg70(image: Image.Image) -> Image.Image:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, "JPEG", quality=70)
    return Image.open(io.BytesIO(buffer.getvalue()))


def resized(factor: float) -> Callable[[Image.Image], Image.Image]:
    return lambda image: image.resize((round(image.width * factor), round(image.height * factor)), Image.LANCZOS)


def cropped(image: Image.Image, fraction: float = 0.05) -> Image.Image:
    dx, dy = round(image.width * fraction), round(image.height * fraction)
    return image.crop((dx, dy, image.width - dx, image.height - dy))


def turned(how: Image.Transpose) -> Callable[[Image.Image], Image.Image]:
    return lambda image: jpeg70(image.transpose(how))


COPIES = {
    "jpeg q70": jpeg70,
    "0.5x": resized(0.5),
    "0.75x": resized(0.75),
    "5% off each edge": cropped,
    "mirrored (jpeg q70)": turned(Image.Transpose.FLIP_LEFT_RIGHT),
    "rotated 90 (jpeg q70)": turned(Image.Transpose.ROTATE_90),
    "rotated 180 (jpeg q70)": turned(Image.Transpose.ROTATE_180),
}


def banked(image: Image.Image, name: str, decided_by: str = "review", **fields) -> BankEntry:  # type: ignore[no-untyped-def]
    pdq, quality = pdq_of(image)
    return BankEntry(
        image_sha256=hashlib.sha256(name.encode()).hexdigest(),
        pdq=pdq,
        pdq_quality=quality,
        pdq_crops=crop_hashes(image),
        pdq_dihedral=dihedral_hashes(image),
        event_id=name,
        label="fake",
        decided_by=decided_by,
        decided_at=NOW,
    ).model_copy(update=fields)


def hashed(pdq: str, name: str, *, decided_by: str = "model", quality: int = 100, at: datetime = NOW) -> BankEntry:
    return BankEntry(
        image_sha256=hashlib.sha256(name.encode()).hexdigest(),
        pdq=pdq,
        pdq_quality=quality,
        event_id=name,
        label="fake",
        decided_by=decided_by,  # type: ignore[arg-type]
        decided_at=at,
    )


def flipped(pdq: str, bits: int, start: int = 0) -> str:
    value = int(pdq, 16)
    for bit in range(start, start + bits):
        value ^= 1 << bit
    return f"{value:064x}"


def confirmed_fakes() -> list[Image.Image]:
    """Synthetic fakes, and drawn photos standing in for fakes, that PDQ hashes reliably. Drawn photos are
    mostly flat gradients: one of quality 51-55 gives copies below 50, which are never matched by design."""
    images = [make_sample(DEMO_SEED, i).image for i in range(0, 24, 2)]
    images += [draw_image(seed) for seed in range(30)]
    return [image for image in images if pdq_of(image)[1] >= neardup.MIN_QUALITY + 10]


def reference_pdq(image: Image.Image) -> tuple[str, int]:
    """PDQ of the whole image, as HMA's pdq_hasher computes it: the bits, MSB first."""
    bits, quality = pdqhash.compute(np.asarray(image.convert("RGB")))
    return f"{int(''.join(map(str, bits.tolist())), 2):064x}", int(quality)


def test_pdq_is_hmas_hex_and_works_on_every_mode() -> None:
    # A grey image of PDQ's own 64x64 is hashed as it is: the same bits and quality as the reference.
    grey = make_sample(DEMO_SEED, 0).image.convert("L").resize((neardup.PDQ_PX, neardup.PDQ_PX)).convert("RGB")
    assert pdq_of(grey) == reference_pdq(grey)
    image = make_sample(DEMO_SEED, 0).image
    pdq, quality = pdq_of(image)
    assert len(pdq) == 64 and 0 <= quality <= 100
    for mode in ("L", "RGBA", "P", "CMYK"):
        assert hamming(pdq_of(image.convert(mode))[0], pdq) <= 16, mode


def test_the_box_reduced_hash_stays_near_pdq_of_the_whole_image() -> None:
    """PDQ_PX: pdq_of box-reduces the luma to 64x64 where PDQ would filter the whole image down to it."""
    distances = sorted(hamming(pdq_of(image)[0], reference_pdq(image)[0]) for image in confirmed_fakes())
    print(f"box-reduced to {neardup.PDQ_PX} px vs PDQ on the whole image: {distances} bits")
    assert np.median(distances) <= 12 and max(distances) <= DEFAULT_MAX_DISTANCE


def test_large_images_are_downscaled_first_and_hash_within_a_few_bits_of_full_size() -> None:
    distances = []
    for i in range(6):
        large = make_sample(DEMO_SEED, i).image.resize((1344, 1344), Image.BICUBIC)
        bits, _ = pdqhash.compute(np.asarray(large))  # the whole 1344x1344 image through PDQ's Jarosz filter
        full = f"{int(''.join(map(str, bits.tolist())), 2):064x}"
        distances.append(hamming(full, pdq_of(large)[0]))
    print(f"full size vs downscaled to {neardup.DOWNSAMPLE_PX} px: {sorted(distances)} bits")
    assert max(distances) <= 16


def test_copies_of_a_confirmed_fake_are_matched_within_the_default_threshold() -> None:
    fakes = confirmed_fakes()
    bank = HashBank()
    for i, image in enumerate(fakes):
        bank.add(banked(image, f"fake-{i}"))
    worst: dict[str, int] = {}
    for (name, copy), (i, image) in itertools.product(COPIES.items(), enumerate(fakes)):
        pdq, quality = pdq_of(copy(image))
        found = bank.nearest(pdq, DEFAULT_MAX_DISTANCE, quality=quality)
        assert found is not None, (name, i)
        assert found[0].event_id == f"fake-{i}", (name, i, found)
        worst[name] = max(worst.get(name, 0), found[1])
    print(f"{len(fakes)} fakes, worst distance of a copy to its original: {worst}")


UNTURNED = ("jpeg q70", "0.5x", "0.75x", "5% off each edge")


def test_a_mirrored_copy_is_as_far_as_an_unrelated_image_from_its_original_but_not_from_its_mirror_hash() -> None:
    """Why the bank keeps the dihedral hashes: plain PDQ of a mirrored copy is ~128 bits off, as a stranger's."""
    for image in confirmed_fakes()[:6]:
        mirrored = pdq_of(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))[0]
        assert hamming(mirrored, pdq_of(image)[0]) > 2 * DEFAULT_MAX_DISTANCE
        assert hamming(mirrored, dihedral_hashes(image)[0]) <= 8


def test_unrelated_demo_and_pillow_style_images_are_never_matched(tmp_path: Path) -> None:
    paths = write_images(tmp_path / "demo", 12, DEMO_SEED) + write_samples(tmp_path / "pillow", 24)
    paths += write_images(tmp_path / "synthetic", 24, 7)
    images = {
        path.name if "pillow" in str(path) else f"{path.parent.name}/{path.name}": Image.open(path) for path in paths
    }
    entries = {name: banked(image, name) for name, image in images.items()}
    bank = HashBank()
    for entry in entries.values():
        bank.add(entry)
    unrelated, false_matches, pairs = [], 0, 0
    for name, entry in entries.items():
        for other_name, other in entries.items():
            if other_name == name:
                continue
            pairs += 1
            unrelated.append(min(hamming(entry.pdq, h) for h in (other.pdq, *other.pdq_crops, *other.pdq_dihedral)))
        found = bank.nearest(entry.pdq, DEFAULT_MAX_DISTANCE, quality=entry.pdq_quality)
        false_matches += found is not None and found[0].event_id != name
    related = [
        hamming(pdq_of(copy(image))[0], entries[name].pdq)
        for name, image in images.items()
        for label, copy in COPIES.items()
        if entries[name].pdq_quality >= neardup.MIN_QUALITY and label in UNTURNED
    ]
    print(
        f"{len(images)} images, {pairs} ordered pairs at threshold {DEFAULT_MAX_DISTANCE}: "
        f"{false_matches} false matches; unrelated distance min {min(unrelated)} "
        f"p1 {np.percentile(unrelated, 1):.0f} median {np.median(unrelated):.0f}; "
        f"copies to their own original's hash (no crop hashes) max {max(related)}"
    )
    assert false_matches == 0
    assert min(unrelated) > DEFAULT_MAX_DISTANCE


def test_a_review_outranks_the_model_for_the_same_image_and_in_near_ties() -> None:
    base = pdq_of(make_sample(DEMO_SEED, 0).image)[0]
    bank = HashBank()
    assert bank.add(hashed(base, "same", decided_by="review"))
    assert not bank.add(hashed(flipped(base, 3), "same", decided_by="model"))  # the model does not overwrite a person
    assert bank.by_sha256(hashed(base, "same").image_sha256).decided_by == "review"  # type: ignore[union-attr]
    assert bank.add(hashed(flipped(base, 1), "same", decided_by="review"))  # a later review does
    assert len(bank) == 1

    bank = HashBank()
    bank.add(hashed(flipped(base, 10), "model-closer", decided_by="model"))
    bank.add(hashed(flipped(base, 10 + neardup.REVIEW_PREFERENCE_BITS, 100), "review-near", decided_by="review"))
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=100)[0].event_id == "review-near"  # type: ignore[index]
    bank.add(hashed(flipped(base, 2), "model-much-closer", decided_by="model"))
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=100)[0].event_id == "model-much-closer"  # type: ignore[index]
    bank.add(hashed(flipped(base, 2, 200), "newer", decided_by="model", at=NOW + timedelta(hours=1)))
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=100)[0].event_id == "newer"  # type: ignore[index]


def test_low_quality_entries_and_queries_never_match_and_the_threshold_holds() -> None:
    base = pdq_of(make_sample(DEMO_SEED, 0).image)[0]
    bank = HashBank()
    bank.add(hashed(base, "blurry", quality=49))
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=100) is None
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, 40, quality=100) is not None
    bank.add(hashed(flipped(base, DEFAULT_MAX_DISTANCE + 1), "far"))
    bank.add(hashed(flipped(base, DEFAULT_MAX_DISTANCE), "edge"))
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=49) is None
    assert bank.nearest(base, DEFAULT_MAX_DISTANCE, quality=50) == (
        bank.by_sha256(hashed(base, "edge").image_sha256),
        31,
    )


def test_tombstones_and_replacements_are_swept_without_losing_entries() -> None:
    rng = np.random.default_rng(0)
    hashes = [f"{int(rng.integers(0, 2**62)):016x}" * 4 for _ in range(3000)]
    bank = HashBank(capacity=16)
    for round_ in range(3):  # every image replaced twice: dead rows pile up and get swept
        for i, pdq in enumerate(hashes):
            bank.add(hashed(pdq, f"image-{i}", at=NOW + timedelta(seconds=round_)))
    for i in range(0, 3000, 2):
        bank.remove(hashed(hashes[i], f"image-{i}").image_sha256)
    assert len(bank) == 1500
    for i in (1, 999, 2999):
        assert bank.nearest(hashes[i], 0, quality=100)[0].event_id == f"image-{i}"  # type: ignore[index]
    assert bank.nearest(hashes[2], 0, quality=100) is None


def test_forged_and_unreadable_records_are_refused_and_counted() -> None:
    def refused(reason: Refusal) -> float:
        return (
            metrics.REGISTRY.get_sample_value("moderation_bank_records_refused_total", {"reason": str(reason)}) or 0.0
        )

    bank, entry = HashBank(), hashed("ab" * 32, "x")
    before = refused(Refusal.KEY_MISMATCH), refused(Refusal.UNREADABLE)
    assert neardup.put_record(bank, b"0" * 64, entry.to_bytes()) is Refusal.KEY_MISMATCH
    assert neardup.put_record(bank, entry.image_sha256.encode(), b"{not json") is Refusal.UNREADABLE
    assert (refused(Refusal.KEY_MISMATCH), refused(Refusal.UNREADABLE)) == (before[0] + 1, before[1] + 1)
    assert neardup.put_record(bank, neardup.bank_key(entry), entry.to_bytes()) is None
    assert len(bank) == 1 and metrics.REGISTRY.get_sample_value("moderation_bank_entries") == 1
    assert neardup.put_record(bank, neardup.bank_key(entry), None) is None  # a tombstone
    assert len(bank) == 0


@pytest.mark.integration
async def test_load_reads_the_compacted_bank_topic_to_its_end_and_keeps_following(lane) -> None:  # type: ignore[no-untyped-def]
    settings = lane.settings.model_copy(update={"topic_bank": f"bank-{lane.settings.topic_cache}"})
    await localstack.create_topics(
        settings.kafka_bootstrap_servers, [settings.topic_bank], 3, compacted=[settings.topic_bank]
    )
    fakes = confirmed_fakes()[:4]
    entries = [banked(image, f"fake-{i}") for i, image in enumerate(fakes)]
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap_servers)
    await producer.start()
    try:
        for entry in entries:
            await producer.send_and_wait(settings.topic_bank, entry.to_bytes(), key=neardup.bank_key(entry))
        await producer.send_and_wait(settings.topic_bank, b"garbage", key=b"k")
        await producer.send_and_wait(settings.topic_bank, entries[0].to_bytes(), key=b"0" * 64)  # forged key

        async def partitions(topic: str) -> set[int]:
            return {0, 1, 2}

        bank = HashBank()
        reader = await neardup.load(bank, settings, partitions)
        try:
            assert len(bank) == len(entries)  # read to its end before returning
            pdq, quality = pdq_of(cropped(jpeg70(fakes[1])))
            assert bank.nearest(pdq, DEFAULT_MAX_DISTANCE, quality=quality)[0].event_id == "fake-1"  # type: ignore[index]
            later = banked(fakes[0], "later", image_sha256="f" * 64)
            await producer.send_and_wait(settings.topic_bank, later.to_bytes(), key=neardup.bank_key(later))
            await producer.send_and_wait(settings.topic_bank, None, key=neardup.bank_key(entries[2]))
            for _ in range(100):
                if bank.by_sha256("f" * 64) is not None and bank.by_sha256(entries[2].image_sha256) is None:
                    break
                await asyncio.sleep(0.1)
            assert bank.by_sha256("f" * 64) == later and len(bank) == len(entries)
        finally:
            reader.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reader
    finally:
        await producer.stop()
