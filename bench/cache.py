"""Verdict-cache throughput through the real local stack (Tansu + SeaweedFS, no Triton needed).

One worker (the null detector, so the baseline costs no model time either) moderates N uploads of the
SAME image twice: first with the cache off (every event: S3 GET, hash, decode, detect), then with the
cache warm and `MODERATION_CACHE_TRUST_EVENT_SHA256=true` (every event a hit: no S3, no decode, no
model). Each round's events wait on the topic while no worker runs, then a fresh worker drains them;
events/s is measured from the verdicts' decided_at stamps. Target: >= 5,000 hits/s per worker.
The last line is a JSON summary.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit import localstack
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import open_lane
from moderation.devkit.samples import draw_image

TARGET = 5000.0


def run_round(info, workdir: Path, image: Path, count: int, *, cache: bool) -> float:  # type: ignore[no-untyped-def]
    lane = open_lane(
        info,
        workdir / ("cache-on" if cache else "cache-off"),
        prefix="bench-",
        own_bucket=False,
        detector="null",
        batch_size="256",
        batch_wait_s="0.05",
        cache_max_entries="1000" if cache else "0",
        cache_trust_event_sha256="true",
        metrics_port="0",
    )
    settings = lane.settings
    [warm] = asyncio.run(upload_images(settings, [image], bucket=info.bucket))
    events = [warm.model_copy(update={"event_id": f"{settings.kafka_consumer_group}-{i}"}) for i in range(count)]
    worker = lane.worker("first")
    try:  # the first worker puts the verdict on the cache topic (when on) and commits past its event
        asyncio.run(publish(settings, [event_message(warm)]))
        asyncio.run(read_outcomes(settings, {warm.event_id}, timeout_s=120))
    finally:
        stop_worker(worker)
    # The backlog is published while no worker runs, so that the publisher does not share the CPU with it;
    # the second worker reads the cache topic before it consumes.
    asyncio.run(publish(settings, [event_message(e) for e in events]))
    worker = lane.worker("second")
    try:
        outcomes = asyncio.run(read_outcomes(settings, {e.event_id for e in events}, timeout_s=600))
    finally:
        stop_worker(worker)
    ids = {e.event_id for e in events}
    verdicts = [v[-1] for k, v in outcomes.verdicts.items() if k in ids]
    assert len(verdicts) == count, f"{len(verdicts)} of {count} verdicts"
    hits = sum(v.cached for v in verdicts)
    stamps = sorted(v.decided_at.timestamp() for v in verdicts)
    rate = (count - 1) / max(stamps[-1] - stamps[0], 1e-9)
    print(f"cache {'on ' if cache else 'off'}: {count} events, {hits} hits, {rate:,.0f} events/s")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=40_000, help="cache hits to time (the cache-off round: 3,000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        image = workdir / "same.jpg"
        draw_image(0, (1024, 768)).save(image, quality=90)
        info = localstack.up(workdir / "stack", with_triton=False)
        try:
            started = time.monotonic()
            baseline = run_round(info, workdir, image, min(args.events // 4, 3000), cache=False)
            hits = run_round(info, workdir, image, args.events, cache=True)
        finally:
            localstack.down(workdir / "stack")
    summary = {
        "bench": "cache",
        "baseline_events_per_s": round(baseline, 1),
        "hit_events_per_s": round(hits, 1),
        "ratio": round(hits / baseline, 2),
        "target_hits_per_s": TARGET,
        "meets_target": hits >= TARGET,
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
