"""Trust and safety end to end, on the real local stack with the worker as deployed: provenance decides
before the model, reviewer decisions become bank entries that decide re-uploads of the same bytes and their
near-duplicates, per-tenant policy sets the thresholds, and review/flag verdicts land on the review queue."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from PIL import Image

from moderation.adapters.kafka import aiokafka_options
from moderation.devkit import provenance_samples
from moderation.devkit.demo import stop_worker
from moderation.devkit.samples import draw_image, encode
from moderation.events import Verdict
from tests.fixtures.uploads import decide, moderated, upload

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = """
version: "2026-11-29.1"
default:
  match: {max_distance: 31}
tenants:
  strict:
    review_threshold: 0.0
    flag_threshold: 0.0
"""


def review_queue(settings, count: int, timeout_s: float = 60) -> list[Verdict]:
    async def go() -> list[Verdict]:
        consumer = AIOKafkaConsumer(
            settings.topic_review, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
        )
        await consumer.start()
        found: list[Verdict] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(found) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    found.extend(Verdict.model_validate_json(r.value) for r in records)
        finally:
            await consumer.stop()
        return found

    return asyncio.run(go())


def variant(data: bytes) -> bytes:
    """The same picture re-encoded at JPEG quality 70, shrunk to 75% and cropped 4% on every side."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    cropped = image.crop((width // 25, height // 25, width - width // 25, height - height // 25))
    small = cropped.resize((cropped.width * 3 // 4, cropped.height * 3 // 4))
    buffer = io.BytesIO()
    small.save(buffer, format="JPEG", quality=70)
    return buffer.getvalue()


def test_provenance_decisions_matches_and_tenant_policy(lane, tmp_path: Path) -> None:
    policy_file = tmp_path / "policy.yaml"
    policy_file.write_text(POLICY)
    trust_list = tmp_path / "C2PA-TRUST-LIST.pem"  # the devkit's CA as the one anchor
    trust_list.write_bytes(provenance_samples.test_credentials().ca_pem)
    env = {
        "MODERATION_POLICY_FILE": str(policy_file),
        "MODERATION_POLICY_RELOAD_S": "1",
        "MODERATION_C2PA_TRUST_ANCHORS": str(trust_list),
    }
    settings = lane.settings
    plain = encode(draw_image(5, (640, 480)), "JPEG")  # PDQ quality 66: textured enough to be matched
    ai_signed = provenance_samples.signed(
        provenance_samples.sample_image("JPEG", (400, 300), seed=3),
        "JPEG",
        provenance_samples.TRAINED_ALGORITHMIC_MEDIA,
    )
    camera = provenance_samples.signed(
        provenance_samples.sample_image("JPEG", (400, 300), seed=4), "JPEG", provenance_samples.DIGITAL_CAPTURE
    )
    # An AI-generated picture composited into a camera capture: only the parent's manifest says AI.
    composite = provenance_samples.signed(
        provenance_samples.sample_image("JPEG", (400, 300), seed=6),
        "JPEG",
        provenance_samples.DIGITAL_CAPTURE,
        ingredients=(ai_signed,),
    )
    elsewhere = provenance_samples.signed(  # a valid manifest by a signer the trust list does not name
        provenance_samples.sample_image("JPEG", (400, 300), seed=7),
        "JPEG",
        provenance_samples.DIGITAL_CAPTURE,
        credentials=provenance_samples.test_credentials("other"),
    )
    iptc = provenance_samples.iptc_tagged(
        provenance_samples.sample_image("PNG", (300, 300), seed=5), "PNG", provenance_samples.TRAINED_ALGORITHMIC_MEDIA
    )
    worker = lane.worker(**env)
    try:
        files = {"plain.jpg": plain, "ai.jpg": ai_signed, "camera.jpg": camera, "iptc.png": iptc}
        first = upload(lane, tmp_path, files | {"composite.jpg": composite, "elsewhere.jpg": elsewhere})
        by_name = dict(zip(("plain", "ai", "camera", "iptc", "composite", "elsewhere"), first, strict=True))
        verdicts = moderated(lane, first)
        v = {name: verdicts[e.event_id] for name, e in by_name.items()}

        # The file's own AI declaration decides, whatever the model says; the model still ran.
        for name in ("ai", "iptc"):
            assert (v[name].label, v[name].action, v[name].decided_by) == ("fake", "flag", "provenance"), v[name]
            assert v[name].provenance is not None and v[name].provenance.declares_ai
            assert v[name].model.name != "none"
        assert v["ai"].provenance.c2pa is not None and v["ai"].provenance.c2pa.validation_state == "Trusted"
        # The composite's AI parent is its own evidence: reported, and the model still decides the label.
        c = v["composite"].provenance
        assert c is not None and c.c2pa is not None and c.c2pa.validation_state == "Trusted"
        assert c.ingredient_declares_ai and not c.declares_ai and v["composite"].decided_by == "model"
        assert c.c2pa.ingredient_source_types == [provenance_samples.TRAINED_ALGORITHMIC_MEDIA]
        e = v["elsewhere"].provenance
        assert e is not None and e.c2pa is not None and e.c2pa.validation_state == "Valid" and e.declares_capture
        # A valid camera-capture manifest is evidence only.
        assert v["camera"].decided_by == "model" and v["camera"].provenance.declares_capture
        assert v["plain"].decided_by == "model" and v["plain"].provenance is None
        assert v["plain"].image.pdq is not None and v["plain"].policy_version == "2026-11-29.1"
        assert {x.event_id for x in review_queue(settings, 2)} >= {v["ai"].event_id, v["iptc"].event_id}

        # A reviewer confirms the plain image as fake: its exact bytes and a re-encoded, resized, cropped copy
        # are decided by that decision from now on (the worker banks the decision, every worker follows the bank).
        decide(settings, v["plain"], "confirm_fake")
        deadline = time.monotonic() + 60
        while lane.counter("moderation_decisions_banked_total") < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        time.sleep(2)  # the bank follower reads the entry the decisions agent published
        mirrored = encode(Image.open(io.BytesIO(plain)).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "JPEG")
        again = upload(lane, tmp_path, {"again.jpg": plain, "copy.jpg": variant(plain), "mirror.jpg": mirrored})
        later = moderated(lane, again)
        exact, copy, mirror = (later[e.event_id] for e in again)
        assert (exact.label, exact.action, exact.decided_by) == ("fake", "flag", "review"), exact
        assert exact.match is not None and exact.match.event_id == v["plain"].event_id and exact.match.distance == 0
        assert (copy.label, copy.decided_by) == ("fake", "match"), copy
        assert copy.match is not None and copy.match.event_id == v["plain"].event_id
        assert copy.match.distance <= 31  # 0 here: the copy's hash equals the banked 4% crop's (64x64 luma)
        # A mirrored copy: its PDQ is ~128 bits from the original's, within a few of the banked mirror hash.
        assert (mirror.label, mirror.decided_by) == ("fake", "match"), mirror
        assert mirror.match is not None and mirror.match.event_id == v["plain"].event_id

        # Per-tenant policy: the strict tenant flags everything; others keep the default thresholds.
        strict = upload(lane, tmp_path, {"strict.png": encode(draw_image(11, (500, 400)), "PNG")}, tenant="strict")
        s = moderated(lane, strict)[strict[0].event_id]
        assert s.action == "flag" and s.decided_by == "model" and s.policy_version == "2026-11-29.1"

        # An edit of the policy file is picked up without a restart.
        policy_file.write_text(POLICY.replace("2026-11-29.1", "2026-11-29.2"))
        deadline = time.monotonic() + 30
        while "2026-11-29.2" not in lane.scrape()[1] and time.monotonic() < deadline:
            time.sleep(0.5)
        late = upload(lane, tmp_path, {"late.png": encode(draw_image(12, (500, 400)), "PNG")})
        assert moderated(lane, late)[late[0].event_id].policy_version == "2026-11-29.2"
    finally:
        stop_worker(worker)
