"""The whole review loop on the real local stack: the worker flags an upload onto the review queue, a reviewer
confirms it in the console with the keyboard (a real headless Chromium), the worker banks the decision, and a
re-encoded, shrunk, cropped copy uploaded later is decided by it."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pydantic import SecretStr

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import Lane
from moderation.devkit.samples import draw_image, encode
from moderation.events import UploadEvent, Verdict
from tests.fixtures.console import ConsoleServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "carol-" + "c3" * 12


def moderated(lane: Lane, paths: list[Path]) -> list[Verdict]:
    async def go() -> list[Verdict]:
        bucket = lane.settings.s3_allowed_buckets[0]
        events: list[UploadEvent] = await upload_images(lane.settings, paths, bucket=bucket, tenant="t1")
        await publish(lane.settings, [event_message(e) for e in events])
        outcomes = await read_outcomes(lane.settings, {e.event_id for e in events}, timeout_s=240)
        return [outcomes.verdicts[e.event_id][-1] for e in events]

    return asyncio.run(go())


def copy_of(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = image.size
    small = image.crop((w // 20, h // 20, w - w // 20, h - h // 20)).resize((w * 2 // 3, h * 2 // 3))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=75)
    return out.getvalue()


def test_a_flag_decided_in_the_console_decides_its_copies(lane: Lane, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    original = tmp_path / "original.jpg"
    original.write_bytes(encode(draw_image(5, (640, 480)), "JPEG"))  # PDQ quality 66
    # Thresholds at 0: the tiny model's score does not matter, every upload is flagged for review.
    worker = lane.worker(MODERATION_REVIEW_THRESHOLD="0", MODERATION_FLAG_THRESHOLD="0")
    try:
        [flagged] = moderated(lane, [original])
        assert flagged.action == "flag" and flagged.decided_by == "model"

        settings = lane.settings.model_copy(update={"review_tokens": SecretStr(f"carol:{TOKEN}")})
        with ConsoleServer(settings) as console:
            browser.get(console.url + "/login")
            browser.find_element(By.ID, "token").send_keys(TOKEN + "\n")
            selector = f'article.item[data-event-id="{flagged.event_id}"]'
            WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, selector))
            item = browser.find_element(By.CSS_SELECTOR, selector)
            item.find_element(By.TAG_NAME, "h2").click()
            ActionChains(browser).send_keys("f").perform()
            WebDriverWait(browser, 30).until(lambda d: "Decision recorded" in d.page_source)

        deadline = time.monotonic() + 60
        while lane.counter("moderation_decisions_banked_total") < 1:
            assert time.monotonic() < deadline, lane.log()[-3000:]
            time.sleep(0.5)
        time.sleep(2)  # the worker's bank follower reads the entry its decisions agent published
        copy = tmp_path / "copy.jpg"
        copy.write_bytes(copy_of(original.read_bytes()))
        again, matched = moderated(lane, [original, copy])
    finally:
        stop_worker(worker)
    assert (again.label, again.decided_by) == ("fake", "review")
    assert (matched.label, matched.decided_by) == ("fake", "match"), matched
    assert matched.match is not None and matched.match.event_id == flagged.event_id
    assert matched.match.decided_by == "review"
