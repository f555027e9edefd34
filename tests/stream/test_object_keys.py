"""Event ids and object keys nobody can mistake: any schema-valid event id (`.`, `..`, `a:b`) and any key
(unicode, `:`) works in the worker and in every review console URL; a key with a `.` or `..` path segment is
refused by us with the reason `unsafe_key` (a dead letter in the worker, 400 in the console), never fetched
as whatever object URL handling resolves it to. On the real stack, the console in a real Chromium."""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from moderation.adapters.s3 import has_dot_segments
from moderation.client import event_message, publish, read_outcomes
from moderation.devkit import localstack
from moderation.devkit.demo import put_objects, stop_worker
from moderation.devkit.lanes import Lane
from moderation.devkit.samples import write_samples
from moderation.events import UploadEvent
from tests.fixtures.console import ConsoleServer
from tests.fixtures.review import ALICE_TOKEN, console_settings, produce, verdict_of

# Keys S3 stores as they are; the event ids are schema-valid and `.`/`..` are dot segments in a URL path.
GOOD = {".": "画像/ünïcödé.png", "..": "a:b/c d.png", "a:b": "x/.hidden/..png"}
# Each names `target.png` once a client or server resolves its dot segments.
UNSAFE = {"up": "../target.png", "here": "./target.png", "in-between": "a/../target.png", "dot": "a/./target.png"}


def test_dot_segments_are_whole_segments_only() -> None:
    assert all(has_dot_segments(key) for key in (*UNSAFE.values(), ".", "..", "a/..", "a/.", "a//../b"))
    assert not any(has_dot_segments(key) for key in (*GOOD.values(), "...", "a..b", ".a/b.", "a/.../b", ""))


def events_for(settings: Any, path: Path, keys: dict[str, str], prefix: str) -> list[UploadEvent]:
    data, bucket = path.read_bytes(), settings.s3_allowed_buckets[0]
    return [
        UploadEvent(
            schema_version=1,
            event_id=f"{prefix}{event_id}",
            bucket=bucket,
            key=key,
            sha256=hashlib.sha256(data).hexdigest(),
            uploaded_at=datetime.now(UTC),
        )
        for event_id, key in keys.items()
    ]


def put_good_objects(settings: Any, path: Path) -> None:
    data = path.read_bytes()
    put_objects(settings, settings.s3_allowed_buckets[0], {key: data for key in (*GOOD.values(), "target.png")})


@pytest.mark.integration
@pytest.mark.slow
def test_the_worker_moderates_any_valid_id_and_key_and_dead_letters_dot_segments(lane: Lane, tmp_path: Path) -> None:
    settings = lane.settings
    (image,) = write_samples(tmp_path, 1, seed=3)
    put_good_objects(settings, image)
    events = events_for(settings, image, GOOD, "") + events_for(settings, image, UNSAFE, f"{uuid.uuid4().hex[:6]}-")
    worker = lane.worker()
    try:
        messages = [event_message(e) for e in events]

        async def go() -> Any:
            await publish(settings, messages)
            return await read_outcomes(settings, {e.event_id for e in events}, timeout_s=240)

        outcomes = asyncio.run(go())
    finally:
        stop_worker(worker)
    for event in events[: len(GOOD)]:
        assert event.event_id in outcomes.verdicts, (event, outcomes.dead_letters.get(event.event_id))
        assert outcomes.verdicts[event.event_id][-1].key == event.key
    for event, (_, value) in zip(events[len(GOOD) :], messages[len(GOOD) :], strict=True):
        [letter] = outcomes.dead_letters[event.event_id]
        assert (letter.reason, letter.retryable) == ("unsafe_key", False), letter
        assert letter.payload() == value  # the original bytes, to inspect


@pytest.mark.integration
@pytest.mark.slow
def test_the_console_serves_any_valid_id_and_key_and_refuses_dot_segments_with_400(
    lane: Lane, stack: localstack.StackInfo, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    settings, _ = console_settings(lane, stack)
    (image,) = write_samples(tmp_path, 1, seed=4)
    put_good_objects(settings, image)
    good = [verdict_of(e, image, action="flag") for e in events_for(settings, image, GOOD, "")]
    unsafe = verdict_of(events_for(settings, image, {"unsafe": "a/../target.png"}, "")[0], image, action="flag")
    produce(settings, settings.topic_review, [*good, unsafe])

    with ConsoleServer(settings) as console:
        bearer = {"Authorization": f"Bearer {ALICE_TOKEN}"}
        for v in good:
            status, headers, body = console.get(f"/image?event_id={v.event_id}", bearer)
            assert (status, body) == (200, image.read_bytes()), v.event_id
        status, headers, body = console.get("/image?event_id=unsafe", bearer)
        assert status == 400 and b"unsafe_key" in body and not headers["content-type"].startswith("image/")

        # In a browser, the page's own URLs for `.`, `..` and `a:b` load their images (/image/.. would be /).
        browser.get(console.url + "/login")
        browser.find_element(By.ID, "token").send_keys(ALICE_TOKEN + "\n")
        WebDriverWait(browser, 20).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "article.item")) == 4)
        for v in good:
            item = browser.find_element(By.CSS_SELECTOR, f'article.item[data-event-id="{v.event_id}"]')
            img = item.find_element(By.TAG_NAME, "img")
            WebDriverWait(browser, 20).until(
                lambda _, img=img: browser.execute_script("return arguments[0].complete", img)
            )
            assert browser.execute_script("return arguments[0].naturalWidth", img) == v.image.width, v.event_id
