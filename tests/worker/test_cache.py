"""The verdict cache: bounded, aged, keyed by image and weights, refusing poisoned entries; shared across
worker restarts on the real stack, and never holding up verdicts when its topic cannot be written."""

from __future__ import annotations

import asyncio
import hashlib
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client.parser import text_string_to_metric_families

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import committed_offsets
from moderation.events import CacheEntry, ImageInfo, ModelInfo
from moderation.model.identity import combined_identity, directory_digest, weights_identity
from moderation.worker.cache import Refusal, VerdictCache, cache_key

MODEL = ModelInfo(name="fakevlm", version="1 (tiny)", weights="sha256:" + "1" * 64)
NOW = datetime(2026, 11, 27, tzinfo=UTC)


def entry(sha: str, score: float = 0.9, explanation: str | None = "This is a fake image.", **extra) -> CacheEntry:  # type: ignore[no-untyped-def]
    return CacheEntry(
        image_sha256=sha * 64,
        label="fake" if score >= 0.5 else "real",
        score=score,
        explanation=explanation,
        model=extra.get("model", MODEL),
        image=ImageInfo(width=1, height=1, format="PNG"),
        decided_at=extra.get("decided_at", NOW),
    )


def cache(max_entries: int = 3, ttl_s: float = 60.0, now: float = NOW.timestamp() + 1) -> VerdictCache:
    return VerdictCache(max_entries, ttl_s, max_skew_s=30.0, clock=lambda: now)


def record(e: CacheEntry) -> tuple[bytes, bytes]:
    return cache_key(e.image_sha256, e.model).encode(), e.to_bytes()


def test_a_stored_entry_is_served_for_the_same_weights_only() -> None:
    c = cache()
    c.put(entry("a"))
    assert c.get("a" * 64, model=MODEL) == entry("a")
    # Another version label or checkpoint path with the same weights: the same model.
    assert c.get("a" * 64, model=MODEL.model_copy(update={"version": "2 (/other/path)"}))
    other = MODEL.model_copy(update={"weights": "sha256:" + "2" * 64})
    assert c.get("a" * 64, model=other) is None
    assert c.get("b" * 64, model=MODEL) is None


def test_two_weights_keep_their_own_entries_for_the_same_image() -> None:
    c = cache()
    other = MODEL.model_copy(update={"weights": "hf:lingcco/fakeVLM@" + "a" * 40})
    c.put(entry("a", score=0.9))
    c.put(entry("a", score=0.1, model=other))
    assert c.get("a" * 64, model=MODEL).score == 0.9  # type: ignore[union-attr]
    assert c.get("a" * 64, model=other).score == 0.1  # type: ignore[union-attr]


def test_weights_of_unknown_identity_never_hit() -> None:
    c = cache()
    unknown = MODEL.model_copy(update={"weights": None})
    assert c.put(entry("a", model=unknown)) is Refusal.UNKNOWN_WEIGHTS and len(c) == 0
    c.put(entry("a"))
    assert c.get("a" * 64, model=unknown) is None


def test_a_future_dated_entry_is_refused_beyond_the_clock_skew_allowance() -> None:
    c = cache(now=NOW.timestamp())
    assert c.put(entry("a", decided_at=NOW + timedelta(days=365))) is Refusal.FUTURE
    assert c.get("a" * 64, model=MODEL) is None
    assert c.put(entry("b", decided_at=NOW + timedelta(seconds=29))) is None  # within the allowance


def test_a_record_keyed_for_another_image_or_model_is_refused() -> None:
    c = cache()
    key, value = record(entry("a"))
    assert c.put_record(record(entry("b"))[0], value) is Refusal.KEY_MISMATCH  # wrong sha256 in the key
    assert c.put_record(("a" * 64).encode(), value) is Refusal.KEY_MISMATCH  # the sha256 alone (old key)
    other = MODEL.model_copy(update={"weights": "sha256:" + "2" * 64})
    assert c.put_record(cache_key("a" * 64, other).encode(), value) is Refusal.KEY_MISMATCH
    assert c.put_record(None, value) is Refusal.KEY_MISMATCH
    assert len(c) == 0
    assert c.put_record(b"x", b"{not json") is Refusal.UNREADABLE
    assert c.put_record(key, value) is None and c.get("a" * 64, model=MODEL) == entry("a")


def test_an_entry_without_an_explanation_is_still_a_hit() -> None:
    """A verdict never waits for an explanation: the hit is served and the explanation asked for apart."""
    c = cache()
    c.put(entry("a", score=0.9, explanation=None))
    assert c.get("a" * 64, model=MODEL) == entry("a", score=0.9, explanation=None)


def test_the_least_recently_used_entry_goes_first() -> None:
    c = cache(max_entries=2)
    c.put(entry("a"))
    c.put(entry("b"))
    c.get("a" * 64, model=MODEL)
    c.put(entry("c"))
    assert len(c) == 2 and c.get("b" * 64, model=MODEL) is None


def test_old_entries_are_not_served() -> None:
    c = cache(ttl_s=60, now=NOW.timestamp() + 61)
    assert c.put(entry("a")) is Refusal.EXPIRED
    later = cache(ttl_s=60, now=NOW.timestamp() + 1)
    later.put(entry("a"))
    later._clock = lambda: NOW.timestamp() + 61
    assert later.get("a" * 64, model=MODEL) is None and len(later) == 0


# -- the weights' identity ---------------------------------------------------------------------------


def checkpoint(directory: Path, weights: bytes = b"\x00" * 1000) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text("{}")
    (directory / "model.safetensors").write_bytes(weights)
    return directory


def test_a_directory_is_named_by_its_content_not_its_path(tmp_path: Path) -> None:
    first = weights_identity(checkpoint(tmp_path / "a"))
    assert first.startswith("sha256:") and first == weights_identity(checkpoint(tmp_path / "b"))
    (tmp_path / "a" / ".cache").mkdir()  # what `hf download --local-dir` records about the download
    (tmp_path / "a" / ".cache" / "download.metadata").write_text("when")
    assert weights_identity(tmp_path / "a") == first
    checkpoint(tmp_path / "a", b"\x00" * 999 + b"\x01")  # one byte of the weights differs
    assert weights_identity(tmp_path / "a") != first
    inner = hashlib.sha256(b"{}").hexdigest()
    assert (
        directory_digest(tmp_path / "b")
        == "sha256:"
        + hashlib.sha256(
            f"config.json\x002\x00{inner}\n".encode()
            + f"model.safetensors\x001000\x00{hashlib.sha256(bytes(1000)).hexdigest()}\n".encode()
        ).hexdigest()
    )


def test_a_hub_cache_snapshot_is_named_by_its_commit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = checkpoint(tmp_path / "hub" / "models--lingcco--fakeVLM" / "snapshots" / commit)
    assert weights_identity(snapshot) == f"hf:lingcco/fakeVLM@{commit}"
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "hub" / "models--lingcco--fakeVLM" / "refs").mkdir()
    (tmp_path / "hub" / "models--lingcco--fakeVLM" / "refs" / "main").write_text(commit)
    assert weights_identity("lingcco/fakeVLM") == f"hf:lingcco/fakeVLM@{commit}"
    assert combined_identity([snapshot, snapshot]) != combined_identity([snapshot])


def test_the_in_process_detector_names_its_weights_by_their_digest(tiny_checkpoint: Path) -> None:
    from moderation.model.detectors import InProcessDetector, running

    async def model() -> ModelInfo:
        async with running(InProcessDetector(tiny_checkpoint)) as detector:
            return detector.model

    assert asyncio.run(model()).weights == weights_identity(tiny_checkpoint) == directory_digest(tiny_checkpoint)


async def cache_records(settings, timeout_s: float = 10.0) -> list[tuple[bytes | None, bytes | None]]:  # type: ignore[no-untyped-def]
    from moderation.adapters.kafka import aiokafka_options

    consumer = AIOKafkaConsumer(
        settings.topic_cache, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        found: list[tuple[bytes | None, bytes | None]] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not found:
            for records in (await consumer.getmany(timeout_ms=500)).values():
                found += [(r.key, r.value) for r in records]
        return found
    finally:
        await consumer.stop()


@pytest.mark.integration
def test_identical_bytes_reach_the_model_once_across_worker_restarts(
    lane, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    settings = lane.settings
    image = tmp_path / "same.png"
    from moderation.devkit.samples import draw_image

    draw_image(3, (320, 240)).save(image)
    bucket = settings.s3_allowed_buckets[0]

    def run(copies: int, name: str) -> dict[str, bool]:
        events = asyncio.run(upload_images(settings, [image] * copies, bucket=bucket))
        asyncio.run(publish(settings, [event_message(e) for e in events]))
        worker = lane.worker(name, MODERATION_EXPLAIN_ABOVE="0.0")
        try:
            outcomes = asyncio.run(read_outcomes(settings, {e.event_id for e in events}, timeout_s=240))
        finally:
            stop_worker(worker)
        verdicts = {eid: vs[-1] for eid, vs in outcomes.verdicts.items() if eid in {e.event_id for e in events}}
        assert len(verdicts) == copies, lane.log(name)[-2000:]
        assert len({(v.score, v.explanation) for v in verdicts.values()}) == 1, "a hit says what the model said"
        models.update(v.model for v in verdicts.values())
        return {eid: v.cached for eid, v in verdicts.items()}

    models: set[ModelInfo] = set()
    first = run(1, "first")
    assert list(first.values()) == [False]
    # The model's identity is the digest of the weights Triton loaded, learnt from Triton itself.
    [model] = models
    assert model.weights == weights_identity(tiny_checkpoint)  # the session's stack serves the tiny checkpoint
    [(key, value)] = asyncio.run(cache_records(settings))
    stored = CacheEntry.model_validate_json(value or b"")
    assert key == cache_key(stored.image_sha256, model).encode() and stored.model == model
    time.sleep(1)
    again = run(4, "second")  # a new worker process: it reads the cache topic to its end before consuming
    assert all(again.values()), again
    assert "verdict cache: 1 entries loaded" in lane.log("second")
    assert models == {model}


def scrape_metric(lane, name: str, **labels: str) -> float:  # type: ignore[no-untyped-def]
    status, text = lane.scrape()
    if status != 200:
        return 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and labels.items() <= sample.labels.items():
                return float(sample.value)
    return 0.0


@pytest.mark.integration
def test_a_worker_refuses_poisoned_cache_records(lane, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Records that anyone with write access could put on the cache topic, claiming "real" for an image:
    dated in the future, keyed for other bytes, or made by other weights. None of them is served."""
    from moderation.devkit.samples import draw_image

    settings = lane.settings
    draw_image(7, (96, 64)).save(image := tmp_path / "target.png")
    sha = hashlib.sha256(image.read_bytes()).hexdigest()
    model = ModelInfo(name=settings.triton_model, version="1 (forged)", weights=weights_identity(tiny_checkpoint))
    lie = CacheEntry(
        image_sha256=sha,
        label="real",
        score=0.0,
        explanation="This is a real image.",
        model=model,
        image=ImageInfo(width=96, height=64, format="PNG"),
        decided_at=datetime.now(UTC),
    )
    future = lie.model_copy(update={"decided_at": datetime.now(UTC) + timedelta(days=30)})
    other_weights = lie.model_copy(update={"model": model.model_copy(update={"weights": "sha256:" + "0" * 64})})
    forged = [
        record(future),  # refused: future
        (cache_key("f" * 64, model).encode(), lie.to_bytes()),  # refused: key_mismatch
        (sha.encode(), lie.to_bytes()),  # refused: key_mismatch (the sha256 alone)
        record(other_weights),  # stored, but never served to these weights
    ]
    asyncio.run(publish(settings, forged, topic=settings.topic_cache))
    [event] = asyncio.run(upload_images(settings, [image], bucket=settings.s3_allowed_buckets[0]))
    asyncio.run(publish(settings, [event_message(event)]))
    worker = lane.worker("poisoned")
    try:
        outcomes = asyncio.run(read_outcomes(settings, {event.event_id}, timeout_s=240))
        [verdict] = outcomes.verdicts[event.event_id]
        assert not verdict.cached and verdict.model.weights == model.weights, lane.log("poisoned")[-3000:]
        refused = {
            reason: scrape_metric(lane, "moderation_cache_entries_refused_total", reason=reason)
            for reason in ("future", "key_mismatch")
        }
        assert refused == {"future": 1, "key_mismatch": 2}
    finally:
        stop_worker(worker)
    assert "record refused (future)" in lane.log("poisoned")


@pytest.mark.integration
def test_verdicts_flow_and_offsets_commit_when_the_cache_topic_cannot_be_written(lane, tmp_path: Path) -> None:
    """The broker refuses the cache topic (a name it does not accept): every event still gets its verdict
    and its offset committed; the failed cache publishes are logged and counted, not waited for."""
    from moderation.devkit.samples import draw_image

    settings = lane.settings
    images = []
    for i in range(6):
        draw_image(10 + i, (64, 48)).save(path := tmp_path / f"{i}.png")
        images.append(path)
    events = asyncio.run(upload_images(settings, images, bucket=settings.s3_allowed_buckets[0]))
    asyncio.run(publish(settings, [event_message(e) for e in events]))
    worker = lane.worker(
        "refused",
        MODERATION_TOPIC_CACHE="cache topic the broker refuses!",
        MODERATION_KAFKA_DECLARE_TOPICS="false",
    )
    try:
        outcomes = asyncio.run(read_outcomes(settings, {e.event_id for e in events}, timeout_s=240))
        assert set(outcomes.verdicts) >= {e.event_id for e in events}, lane.log("refused")[-3000:]
        assert not any(v.cached for vs in outcomes.verdicts.values() for v in vs)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and scrape_metric(lane, "moderation_cache_publish_failures_total") < 1:
            time.sleep(1)
        assert scrape_metric(lane, "moderation_cache_publish_failures_total") >= 1, lane.log("refused")[-3000:]
        committed: dict[int, int] = {}
        while time.monotonic() < deadline + 60 and sum(committed.values()) < len(events):
            committed = asyncio.run(committed_offsets(settings))
            time.sleep(1)
        assert sum(committed.values()) == len(events), committed  # one fresh topic: offsets count the events
    finally:
        stop_worker(worker)
    assert "entries not published to cache topic the broker refuses!" in lane.log("refused")
