"""The verdict cache: bounded, aged, model-specific; and across worker restarts on the real stack."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from moderation.cache import VerdictCache
from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.demo import stop_worker
from moderation.events import CacheEntry, ImageInfo, ModelInfo

MODEL = ModelInfo(name="fakevlm", version="1 (tiny)")
NOW = datetime(2026, 11, 27, tzinfo=UTC)


def entry(sha: str, score: float = 0.9, explanation: str | None = "This is a fake image.", **extra) -> CacheEntry:  # type: ignore[no-untyped-def]
    return CacheEntry(
        image_sha256=sha * 64,
        label="fake" if score >= 0.5 else "real",
        score=score,
        explanation=explanation,
        model=extra.get("model", MODEL),
        image=ImageInfo(width=1, height=1, format="PNG"),
        decided_at=NOW,
    )


def cache(max_entries: int = 3, ttl_s: float = 60.0, now: float = NOW.timestamp() + 1) -> VerdictCache:
    return VerdictCache(max_entries, ttl_s, clock=lambda: now)


def test_a_stored_entry_is_served_for_the_same_model() -> None:
    c = cache()
    c.put(entry("a"))
    assert c.get("a" * 64, model=MODEL, explain_above=0.5) == entry("a")
    assert c.get("a" * 64, model=ModelInfo(name="fakevlm", version="2"), explain_above=0.5) is None
    assert c.get("b" * 64, model=MODEL, explain_above=0.5) is None


def test_an_entry_without_the_explanation_policy_now_wants_is_a_miss() -> None:
    c = cache()
    c.put(entry("a", score=0.9, explanation=None))
    assert c.get("a" * 64, model=MODEL, explain_above=0.5) is None
    assert c.get("a" * 64, model=MODEL, explain_above=2.0) is not None


def test_the_least_recently_used_entry_goes_first() -> None:
    c = cache(max_entries=2)
    c.put(entry("a"))
    c.put(entry("b"))
    c.get("a" * 64, model=MODEL, explain_above=0.5)
    c.put(entry("c"))
    assert len(c) == 2 and c.get("b" * 64, model=MODEL, explain_above=0.5) is None


def test_old_entries_are_not_served() -> None:
    c = cache(ttl_s=60, now=NOW.timestamp() + 61)
    c.put(entry("a"))
    assert c.get("a" * 64, model=MODEL, explain_above=0.5) is None and len(c) == 0


@pytest.mark.integration
def test_identical_bytes_reach_the_model_once_across_worker_restarts(lane, tmp_path: Path) -> None:
    settings = lane.settings
    image = tmp_path / "same.png"
    from moderation.samples import draw_image

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
        return {eid: v.cached for eid, v in verdicts.items()}

    first = run(1, "first")
    assert list(first.values()) == [False]
    time.sleep(1)
    again = run(4, "second")  # a new worker process: it reads the cache topic to its end before consuming
    assert all(again.values()), again
    assert "verdict cache: 1 entries loaded" in lane.log("second")
