"""The review console: its queue and identity logic on their own, then the whole console against the real
local stack, driven by a real headless Chromium (Debian's chromium + chromedriver through selenium)."""

from __future__ import annotations

import asyncio
import io
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from moderation.adapters.kafka import aiokafka_options
from moderation.client import upload_images
from moderation.devkit import localstack
from moderation.devkit.lanes import Lane
from moderation.devkit.samples import write_samples
from moderation.events import (
    C2paEvidence,
    Decision,
    Explanation,
    Match,
    Provenance,
    Verdict,
)
from moderation.review import auth
from moderation.review.queue import ReviewQueue
from moderation.review.reader import QueueReader
from moderation.settings import Settings
from tests.fixtures.console import ConsoleServer
from tests.fixtures.review import ALICE_TOKEN, console_settings, produce, verdict, verdict_of

DOCS = Path(__file__).resolve().parents[2] / "docs"
AI_SOURCE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"


def decision_about(item: Verdict, choice: str, *, reviewer: str = "bob", minutes: int = 1) -> Decision:
    return Decision(
        event_id=item.event_id,
        image_sha256=item.image_sha256,
        tenant=item.tenant,
        decision=choice,  # type: ignore[arg-type]
        reviewer=reviewer,
        decided_at=item.decided_at + timedelta(minutes=minutes),
        model_label=item.label,
        model_score=item.score,
        model_action=item.action,
    )


# The queue on its own


def test_queue_lists_review_and_flag_newest_first_and_filters() -> None:
    queue = ReviewQueue()
    assert queue.add_verdict(verdict("old", minutes=0))
    assert queue.add_verdict(verdict("new", minutes=5, action="review", tenant="t2"))
    assert not queue.add_verdict(verdict("fine", minutes=9, action="allow"))
    assert [i.event_id for i in queue.awaiting()] == ["new", "old"]
    assert [i.event_id for i in queue.awaiting(tenant="t2")] == ["new"]
    assert [i.event_id for i in queue.awaiting(action="flag")] == ["old"]
    assert queue.tenants() == ["t1", "t2"]
    assert queue.item("fine") is None


def test_final_decisions_take_an_item_off_escalate_keeps_it_marked() -> None:
    queue = ReviewQueue()
    confirmed, escalated = verdict("c", minutes=1), verdict("e", minutes=2, sha="b" * 64)
    queue.add_decision(decision_about(confirmed, "confirm_fake"))  # read before its verdict: any order works
    queue.add_verdict(confirmed)
    queue.add_verdict(escalated)
    assert queue.add_decision(decision_about(escalated, "escalate"))
    assert not queue.add_decision(decision_about(escalated, "escalate"))  # read back from the topic: once
    listed = queue.awaiting()
    assert [i.event_id for i in listed] == ["e"]
    assert listed[0].escalated
    queue.add_decision(decision_about(escalated, "overturn_real", minutes=3))
    assert queue.awaiting() == []


def test_history_spans_events_of_the_same_bytes_and_the_cap_drops_the_oldest() -> None:
    queue = ReviewQueue(max_items=2)
    first = verdict("first")
    queue.add_verdict(first)
    queue.add_decision(decision_about(first, "confirm_fake"))
    again = verdict("again", minutes=10)  # the same bytes uploaded once more
    queue.add_verdict(again)
    item = queue.item("again")
    assert item is not None
    assert [(d.event_id, d.decision) for d in queue.history(item)] == [("first", "confirm_fake")]
    queue.add_verdict(verdict("third", minutes=20, sha="c" * 64))
    assert len(queue) == 2
    assert queue.item("first") is None


def explanation_of(item: Verdict, text: str, **more: Any) -> Explanation:
    return Explanation(
        event_id=item.event_id,
        image_sha256=item.image_sha256,
        verdict_label=item.label,
        verdict_score=item.score,
        verdict_action=item.action,
        verdict_decided_at=item.decided_at,
        explanation=text,
        answer_label="fake",
        model=item.model,
        requested_at=item.decided_at,
        explained_at=item.decided_at + timedelta(seconds=3),
        explain_ms=3000.0,
        **more,
    )


def test_an_explanation_joins_its_item_whenever_it_is_read() -> None:
    queue = ReviewQueue()
    waiting = verdict("w", explanation=None, explanation_requested=True)
    early = verdict("early", minutes=1, sha="b" * 64, explanation=None, explanation_requested=True)
    queue.add_explanation(explanation_of(early, "This is a fake image. Read before its verdict."))
    queue.add_verdict(waiting)
    queue.add_verdict(early)
    [later, first] = queue.awaiting()
    assert (first.explanation, first.explanation_pending) == (None, True)
    assert later.explanation == "This is a fake image. Read before its verdict." and not later.explanation_pending
    queue.add_explanation(explanation_of(waiting, "This is a fake image. Now here."))
    item = queue.item("w")
    assert item is not None and item.explanation == "This is a fake image. Now here."
    cached = verdict("c", minutes=2, sha="c" * 64)  # a cache hit carries its text itself
    queue.add_verdict(cached)
    assert queue.item("c").explanation == cached.explanation  # type: ignore[union-attr]


def test_the_reader_skips_what_is_not_a_verdict_or_a_decision(caplog: pytest.LogCaptureFixture) -> None:
    settings = Settings(topic_review="review", topic_decisions="decisions", topic_explanations="explained")  # type: ignore[call-arg]
    queue = ReviewQueue()
    reader = QueueReader(settings, queue)
    flagged = verdict("v1")

    def record(topic: str, offset: int, value: bytes | None) -> ConsumerRecord[bytes, bytes]:
        return ConsumerRecord(topic, 0, offset, 0, 0, b"k", value, None, 1, len(value or b""), ())  # type: ignore[arg-type]

    for offset, (topic, value) in enumerate(
        [
            ("review", b"not json"),
            ("review", None),
            ("decisions", flagged.to_bytes()),  # a verdict where a decision belongs
            ("review", flagged.to_bytes()),
            ("decisions", decision_about(flagged, "escalate").to_bytes()),
            ("explained", flagged.to_bytes()),  # a verdict where an explanation belongs
            ("explained", explanation_of(flagged, "This is a fake image. Plastic skin.").to_bytes()),
        ]
    ):
        reader.apply(record(topic, offset, value))
    assert [i.event_id for i in queue.awaiting()] == ["v1"]
    assert queue.awaiting()[0].escalated
    assert queue.awaiting()[0].explained is not None
    wheres = [r.where for r in caplog.records if hasattr(r, "where")]
    assert wheres == ["review[0]@0", "decisions[0]@2", "explained[0]@5"]


# Who decides


def test_tokens_are_pairs_of_reviewer_and_a_long_token() -> None:
    assert auth.parse_tokens(f"alice:{ALICE_TOKEN}, bob:{'b' * 16}") == {ALICE_TOKEN: "alice", "b" * 16: "bob"}
    assert auth.parse_tokens("") == {}
    for bad, said in [
        ("alice", "reviewer:token"),
        (f":{ALICE_TOKEN}", "reviewer:token"),
        ("alice:short", "under 16"),
        (f"alice:{ALICE_TOKEN},bob:{ALICE_TOKEN}", "share"),
    ]:
        with pytest.raises(auth.InvalidTokens, match=said):
            auth.parse_tokens(bad)


def test_identity_from_the_proxy_header_only_when_configured_then_bearer_then_session() -> None:
    tokens = auth.parse_tokens(f"alice:{ALICE_TOKEN}")
    plain, proxied = auth.Reviewers(tokens), auth.Reviewers(tokens, header="X-Forwarded-User")
    assert plain.identify({"X-Forwarded-User": "mallory"}, None) is None
    assert proxied.identify({"X-Forwarded-User": "carol"}, None) == auth.Identity("carol", "header")
    assert plain.identify({"authorization": f"Bearer {ALICE_TOKEN}"}, None) == auth.Identity("alice", "bearer")
    assert plain.identify({"authorization": "Bearer wrong-token-wrong-token"}, "alice") is None
    assert plain.identify({}, "alice") == auth.Identity("alice", "session")
    assert plain.identify({}, "revoked") is None
    assert not auth.Identity("alice", "bearer").ambient
    assert auth.Identity("alice", "session").ambient


def test_sessions_are_signed_expire_and_carry_their_own_csrf_token() -> None:
    sessions = auth.Sessions(b"k" * 32)
    session = sessions.new("alice")
    cookie = sessions.dump(session)
    assert sessions.load(cookie) == session
    nonce, issued, _reviewer, signature = cookie.split(".")
    assert sessions.load(f"{nonce}.{issued}.{auth._b64('mallory')}.{signature}") is None
    assert sessions.load("garbage") is None
    assert auth.Sessions(b"other" * 8).load(cookie) is None
    stale = auth.Session(nonce, int(time.time()) - auth.SESSION_TTL_S - 1, "alice")
    assert sessions.load(sessions.dump(stale)) is None
    assert sessions.check_csrf(session, sessions.csrf_token(session))
    assert not sessions.check_csrf(session, sessions.csrf_token(sessions.new("alice")))


def test_same_origin_wants_our_host_in_origin_or_referer() -> None:
    assert auth.same_origin({"host": "review:8090", "origin": "http://review:8090"})
    assert auth.same_origin({"host": "review:8090", "referer": "https://review:8090/?tenant=t1"})
    assert not auth.same_origin({"host": "review:8090", "origin": "https://evil.example"})
    assert not auth.same_origin({"host": "review:8090", "origin": "null"})
    assert not auth.same_origin({"host": "review:8090"})


# The console against the real stack, in a real browser


def read_decisions(settings: Settings, want: int, timeout_s: float = 60) -> list[tuple[bytes, Decision]]:
    async def run() -> list[tuple[bytes, Decision]]:
        consumer = AIOKafkaConsumer(
            settings.topic_decisions, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
        )
        await consumer.start()
        found: list[tuple[bytes, Decision]] = []
        try:
            deadline = time.monotonic() + timeout_s
            while len(found) < want and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    found += [(r.key, Decision.model_validate_json(r.value)) for r in records]
            await asyncio.sleep(2)  # anything more than wanted would be a decision that must not exist
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                found += [(r.key, Decision.model_validate_json(r.value)) for r in records]
        finally:
            await consumer.stop()
        return found

    return asyncio.run(run())


def save_screenshot(browser: Any, path: Path) -> None:
    """The page as a small PNG (a 256-colour palette is plenty for a form-like page); the README's, in docs/,
    only with UPDATE_SCREENSHOTS=1, so that a test run leaves the checkout as it found it."""
    with Image.open(io.BytesIO(browser.get_screenshot_as_png())) as shot:
        shot.convert("RGB").quantize(256).save(path, optimize=True)


@pytest.mark.integration
@pytest.mark.slow
def test_console_shows_a_flagged_upload_and_records_a_keyboard_decision(
    lane: Lane, stack: localstack.StackInfo, browser: Any, tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    settings, suffix = console_settings(lane, stack)
    outside = f"outside-{suffix}"
    localstack.create_bucket(stack, outside)
    flagged_file, review_file, outside_file = write_samples(tmp_path / "images", 3, seed=7)
    allowed = settings.s3_allowed_buckets[0]
    flagged_event, review_event = asyncio.run(
        upload_images(settings, [flagged_file, review_file], bucket=allowed, tenant="t1")
    )
    (outside_event,) = asyncio.run(upload_images(settings, [outside_file], bucket=outside, tenant="t2"))

    now = datetime.now(UTC).replace(second=0, microsecond=0)
    flagged = verdict_of(
        flagged_event,
        flagged_file,
        action="flag",
        decided_at=now,
        policy_version="2026-11-01",
        explanation=None,
        explanation_requested=True,
        provenance=Provenance(
            c2pa=C2paEvidence(
                validation_state="Valid",
                valid=True,
                claim_generator="Example Image Generator/2.1",
                digital_source_types=[AI_SOURCE],
            ),
            iptc_digital_source_type=AI_SOURCE,
            declares_ai=True,
        ),
    )
    review = verdict_of(
        review_event,
        review_file,
        action="review",
        label="fake",
        score=0.64,
        decided_at=now - timedelta(minutes=3),
        explanation="This is a fake image: the lighting on the left edge does not match the shadows.",
        match=Match(event_id="e-banked", image_sha256="d" * 64, distance=12, label="fake", decided_by="review"),
    )
    beyond = verdict_of(outside_event, outside_file, action="review", decided_at=now - timedelta(minutes=9))
    earlier = decision_about(review.model_copy(update={"event_id": "e-earlier"}), "escalate", minutes=-60)
    produce(settings, settings.topic_review, [beyond, review, flagged])
    produce(settings, settings.topic_decisions, [earlier])

    with ConsoleServer(settings) as console:
        # Anonymous: neither the queue, nor an image, nor a decision.
        assert console.get("/")[0] == 401
        assert console.get("/", {"X-Forwarded-User": "mallory"})[0] == 401  # no proxy header is configured
        assert console.get(f"/image?event_id={flagged.event_id}")[0] == 401
        anonymous = {"event_id": flagged.event_id, "decision": "overturn_real", "note": ""}
        status, _, body = console.post("/decide", anonymous, {"Origin": console.url})
        assert status == 401
        assert b"Sign in first" in body

        # A signed-in session posting from another site, or without the form's token: refused.
        sessions = console.app.state.console.sessions
        session = sessions.new("alice")
        cookie = {"Cookie": f"moderation_review={sessions.dump(session)}"}
        form = anonymous | {"csrf": sessions.csrf_token(session)}
        assert console.post("/decide", form, cookie | {"Origin": "https://evil.example"})[0] == 403
        assert console.post("/decide", anonymous | {"csrf": "forged"}, cookie | {"Origin": console.url})[0] == 403

        # The image: through the allowlist, with the verdict's type, never cached; other buckets never served.
        bearer = {"Authorization": f"Bearer {ALICE_TOKEN}"}
        status, headers, body = console.get(f"/image?event_id={flagged.event_id}", bearer)
        assert status == 200
        assert body == flagged_file.read_bytes()
        assert headers["content-type"] == f"image/{flagged.image.format.lower()}"
        assert headers["cache-control"] == "private, no-store"
        assert headers["x-content-type-options"] == "nosniff"
        status, headers, body = console.get(f"/image?event_id={beyond.event_id}", bearer)
        assert status == 403
        assert body != outside_file.read_bytes()
        assert b"MODERATION_S3_ALLOWED_BUCKETS" in body
        assert not headers["content-type"].startswith("image/")

        # A reviewer signs in with her token and sees the flagged upload, its image loaded.
        browser.get(console.url + "/login")
        browser.find_element(By.ID, "token").send_keys(ALICE_TOKEN + "\n")
        WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.CSS_SELECTOR, "article.item"))
        item = browser.find_element(By.CSS_SELECTOR, f'article.item[data-event-id="{flagged.event_id}"]')
        image = item.find_element(By.TAG_NAME, "img")
        WebDriverWait(browser, 20).until(lambda _: browser.execute_script("return arguments[0].complete", image))
        assert browser.execute_script("return arguments[0].naturalWidth", image) == flagged.image.width
        assert "alice" in browser.find_element(By.CSS_SELECTOR, "header .who").text
        assert "trainedAlgorithmicMedia" in item.text
        assert "0.930" in item.text
        # Its explanation comes later, on its own topic: on its way until then, shown once it is read.
        assert "Explanation on its way" in item.text
        text = "This is a fake image. The fur melts into the fence behind it."
        produce(settings, settings.topic_explanations, [explanation_of(flagged, text)])
        WebDriverWait(browser, 20).until(lambda d: text in (d.refresh() or d.find_element(By.TAG_NAME, "main").text))
        browser.get(console.url + "/?tenant=t1")
        WebDriverWait(browser, 20).until(
            lambda d: all(
                d.execute_script("return arguments[0].naturalWidth", i) > 0 for i in d.find_elements(By.TAG_NAME, "img")
            )
        )
        save_screenshot(browser, (DOCS if os.environ.get("UPDATE_SCREENSHOTS") else tmp_path) / "review-console.png")

        # Focus the flagged item and press f.
        item = browser.find_element(By.CSS_SELECTOR, f'article.item[data-event-id="{flagged.event_id}"]')
        item.find_element(By.TAG_NAME, "h2").click()
        assert browser.switch_to.active_element == item
        ActionChains(browser).send_keys("f").perform()
        WebDriverWait(browser, 20).until(lambda d: "Decision recorded" in d.page_source)
        assert f'data-event-id="{flagged.event_id}"' not in browser.page_source
        assert f'data-event-id="{review.event_id}"' in browser.page_source

        # The next item has the focus: write a note with n, leave it with Esc, escalate with e; it stays listed.
        ActionChains(browser).send_keys("j", "k", "n").perform()
        assert browser.switch_to.active_element.tag_name == "textarea"
        ActionChains(browser).send_keys("lighting as in the banked fake", Keys.ESCAPE, "e").perform()
        WebDriverWait(browser, 20).until(lambda d: f"Decision recorded for {review.event_id}" in d.page_source)
        escalated = browser.find_element(By.CSS_SELECTOR, f'article.item[data-event-id="{review.event_id}"]')
        assert "escalated" in escalated.get_attribute("class")
        assert "alice: escalate" in escalated.text

        # What an SRE scrapes: counts only, no item and no reviewer.
        status, _, body = console.get("/metrics")
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode())
            for s in family.samples
        }
        assert status == 200
        assert samples[("moderation_review_decisions_total", (("decision", "confirm_fake"),))] >= 1
        assert samples[("moderation_review_refusals_total", (("status", "401"),))] >= 4
        assert samples[("moderation_review_reader_up", ())] == 1
        assert samples[("moderation_review_items_awaiting", ())] == 2  # the escalated one and the other bucket's
        assert b"alice" not in body
        listed = DOCS.parent / "deploy" / "observability" / "review-metrics.txt"
        names = {line.split()[0] for line in listed.read_text().splitlines() if line and not line.startswith("#")}
        assert names == {name for name, _ in samples if not name.endswith("_created")}  # what alerts may use

    decisions = read_decisions(settings, want=3)
    ours = sorted(((k, d) for k, d in decisions if d.event_id != earlier.event_id), key=lambda kd: kd[1].decided_at)
    assert len(decisions) == 3, decisions  # the refused posts published nothing
    assert [(d.event_id, d.decision, d.note) for _, d in ours[1:]] == [
        (review.event_id, "escalate", "lighting as in the banked fake")
    ]
    key, decision = ours[0]
    assert key == flagged.event_id.encode()
    assert decision.reviewer == "alice"
    assert decision.decision == "confirm_fake"
    assert (decision.image_sha256, decision.pdq, decision.tenant) == (flagged.image_sha256, flagged.image.pdq, "t1")
    assert (decision.model_label, decision.model_score, decision.model_action) == ("fake", 0.93, "flag")
