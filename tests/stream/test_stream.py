"""The headline: many uploads, good and bad, through a real worker on the real local stack."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from prometheus_client.parser import text_string_to_metric_families

from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import outcomes_for, publish_uploads, raw_messages, wait_for_commits

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCHEMAS = {
    name: json.loads((Path(__file__).parents[2] / "schemas" / f"{name}.schema.json").read_text())
    for name in ("verdict", "dead_letter")
}


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> {(name, sorted labels): value}, via prometheus-client's own parser."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_every_upload_gets_exactly_one_outcome_and_offsets_are_committed(lane, tmp_path: Path) -> None:
    settings = lane.settings
    published = publish_uploads(settings, tmp_path / "images", 50)
    events, bad, ends = published.events, published.bad, published.ends
    assert published.count >= 55 and len({c.reason for c in bad}) >= 5

    worker = lane.worker(MODERATION_EXPLAIN_ABOVE="0.0")
    try:
        outcomes = outcomes_for(settings, published)
        missing = published.expected - outcomes.decided()
        assert not missing, f"no outcome for {missing}\n{lane.log()[-3000:]}"
        committed = wait_for_commits(settings, ends)
        live, ready, scraped = lane.scrape("/live"), lane.scrape("/ready"), lane.scrape("/metrics")[1]
    finally:
        stop_worker(worker)

    assert live[0] == 200 and ready[0] == 200, (live, ready)
    samples = parse_metrics(scraped)
    assert samples[("moderation_events_in_total", ())] == published.count
    assert samples[("moderation_outcomes_total", (("outcome", "verdict"), ("reason", "")))] == len(events)
    for reason, count in Counter(str(c.reason) for c in bad).items():
        assert samples[("moderation_outcomes_total", (("outcome", "dead_letter"), ("reason", reason)))] == count
    verdict_counts = sum(v for (name, _), v in samples.items() if name == "moderation_verdicts_total")
    assert verdict_counts == len(events)
    assert samples[("moderation_end_to_end_seconds_count", ())] == len(events)
    assert samples[("moderation_ready", ())] == 1
    exported = {family.name: family.type for family in text_string_to_metric_families(scraped)}
    for line in (Path(__file__).parents[2] / "deploy/observability/worker-metrics.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind = line.split()[:2]
            family = name.removesuffix("_total") if kind == "counter" else name
            assert exported.get(family) == kind, f"the dashboards and alerts rely on {name} ({kind})"

    good_ids = {e.event_id for e in events}
    wrong = {
        eid: [(d.reason, d.detail) for d in outcomes.dead_letters[eid]] for eid in good_ids - set(outcomes.verdicts)
    }
    assert set(outcomes.verdicts) == good_ids, f"good uploads without a verdict: {wrong}"
    assert all(len(v) == 1 for v in outcomes.verdicts.values()), "exactly one verdict per event_id"
    reasons = {eid: letters for eid, letters in outcomes.dead_letters.items() if eid is not None}
    assert set(reasons) == {c.event_id for c in bad if c.event_id}
    for case in bad:
        if case.event_id is None:
            [letter] = outcomes.dead_letters[None]
        else:
            [letter] = reasons[case.event_id]
        assert letter.reason == case.reason, (case.name, letter.detail)
        assert letter.payload() == case.value, "dead letters carry the original bytes"
    for verdict in (v for vs in outcomes.verdicts.values() for v in vs):
        assert verdict.explanation is None and verdict.explanation_requested  # the text: test_explanations.py
        assert verdict.image.width in (640, 480) and verdict.tenant == "t1"
        assert verdict.model.name == settings.triton_model

    raw = asyncio.run(raw_messages(settings, settings.topic_verdicts))
    assert len(raw) == len(good_ids)
    for value in raw:
        jsonschema.validate(json.loads(value), SCHEMAS["verdict"])
    for value in asyncio.run(raw_messages(settings, settings.topic_dlq)):
        jsonschema.validate(json.loads(value), SCHEMAS["dead_letter"])
    flagged = {eid for eid, vs in outcomes.verdicts.items() if vs[0].action == "flag"}
    assert set(outcomes.flagged) == flagged and all(len(v) == 1 for v in outcomes.flagged.values())

    assert sum(ends.values()) == published.count, "each message has its own offset"
    assert lane.info.s3_secret_key not in lane.log(), "secrets never reach the logs"
    assert committed == ends, f"committed {committed} != end offsets {ends}"
    print(
        f"outcomes: {Counter(v[0].action for v in outcomes.verdicts.values())}, "
        f"dead letters: {Counter(str(c.reason) for c in bad)}"
    )
