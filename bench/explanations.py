"""Does an explanation hold up a verdict? The same paced stream twice through the real local stack, once with
explanations off and once with every image explained; verdict latency of both, and their ratio.

One stack (Tansu, SeaweedFS, Triton serving `fakevlm` and `fakevlm_explain` with the trained tiny FakeVLM on the
CPU), started here in a temporary directory. Each phase gets its own lane (fresh topics and groups) with a
`moderation worker` and a `moderation explainer` process, the verdict cache off:
- baseline: MODERATION_EXPLAIN_ABOVE=2 (no image explained: the explainer idles);
- candidate: MODERATION_EXPLAIN_ABOVE=0 (every image explained, while the verdicts keep coming).
The uploads are the demo's synthetic photographs (PNG, 336 to 512 px, real ones through a simulated camera, fakes
with a generator's fingerprint). Latency = broker timestamp of the output record - of the upload record. The
verdict p99 ratio (candidate / baseline) is the figure: target <= 1.5 on this project's 2-core CPU, where the two
Triton models and both processes share two cores (on a GPU, where the explain model has its own instance, <= 1.2).
Also: explanation latency (from the upload, and after its verdict), explanations published before their verdict
(must be 0), and the bytes of one image's Triton request (uint8 crop) against the fp32 tensor it replaced.
The last line is a JSON summary.

    python bench/explanations.py [--events 150] [--rate 4] [--output F]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from pipeline import events_for, publish_paced, timestamps

from moderation.client import event_message, publish, upload_images
from moderation.devkit import localstack
from moderation.devkit.checkpoints import default_checkpoint
from moderation.devkit.demo import settings_for, stop_worker
from moderation.devkit.lanes import open_lane
from moderation.devkit.synthetic import write_images
from moderation.events import UploadEvent
from moderation.model.imaging import CROP_SIZE, prepare

TARGET_P99_RATIO_CPU = 1.5
TARGET_P99_RATIO_GPU = 1.2
DISTINCT_IMAGES = 32
SEED = 20261207


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_phase(
    name: str, info: localstack.StackInfo, workdir: Path, images: list[UploadEvent], args: argparse.Namespace
) -> dict[str, Any]:
    explain_above = "0" if name == "explained" else "2"
    lane = open_lane(
        info, workdir / name, prefix=f"bench-{name}-", own_bucket=False, explain_above=explain_above,
        cache_max_entries="0", metrics_port="0",
    )  # fmt: skip
    settings = lane.settings
    processes = [lane.worker(), lane.explainer()]
    try:
        warm = events_for(images, 1, f"{name}-warm-{uuid.uuid4().hex[:6]}")
        asyncio.run(publish(settings, [event_message(e) for e in warm]))  # waits out the group joins
        warm_keys = {warm[0].event_id.encode()}
        asyncio.run(timestamps(settings, settings.topic_verdicts, warm_keys, args.timeout))
        if name == "explained":
            asyncio.run(timestamps(settings, settings.topic_explanations, warm_keys, args.timeout))
        events = events_for(images, args.events, f"{name}-paced")
        keys = {e.event_id.encode() for e in events}
        asyncio.run(publish_paced(settings, events, args.rate))
        sent = asyncio.run(timestamps(settings, settings.topic_uploads, keys, args.timeout))
        decided = asyncio.run(timestamps(settings, settings.topic_verdicts, keys, args.timeout))
        result: dict[str, Any] = _latencies("verdict", [decided[k] - sent[k] for k in keys])
        if name == "explained":
            explained = asyncio.run(timestamps(settings, settings.topic_explanations, keys, args.timeout))
            result |= _latencies("explanation", [explained[k] - sent[k] for k in keys])
            result |= _latencies("after_verdict", [explained[k] - decided[k] for k in keys])
            result["explained_before_verdict"] = sum(explained[k] < decided[k] for k in keys)
        return result
    finally:
        for process in processes:
            stop_worker(process)


def _latencies(what: str, values: list[int]) -> dict[str, float]:
    floats = [float(v) for v in values]
    return {f"{what}_p50_ms": statistics.median(floats), f"{what}_p99_ms": percentile(floats, 0.99)}


def request_bytes(sample: Path) -> dict[str, int]:
    crop = prepare(sample.read_bytes(), max_pixels=10**8).pixels
    return {"uint8_crop": int(crop.nbytes), "fp32_pixel_values": 3 * CROP_SIZE * CROP_SIZE * 4}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=150, help="paced uploads per phase")
    parser.add_argument("--rate", type=float, default=4.0, help="uploads per second")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--output", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    started, lines = time.monotonic(), []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory(prefix="bench-explanations-") as tmp:
        workdir = Path(tmp)
        checkpoint, _ = default_checkpoint(workdir)
        files = write_images(workdir / "images", DISTINCT_IMAGES, SEED)
        sizes = request_bytes(files[0])
        say(
            f"# explanations: {args.events} paced uploads at {args.rate:g}/s per phase, {DISTINCT_IMAGES} distinct "
            f"synthetic PNGs, model {checkpoint.name}; Triton request per image {sizes['uint8_crop']} bytes "
            f"(uint8 crop) vs {sizes['fp32_pixel_values']} (fp32 pixel values)"
        )
        info = localstack.up(workdir / "stack", model_repository=localstack.model_repository_for(workdir, checkpoint))
        try:
            images = asyncio.run(upload_images(settings_for(info), files, bucket=info.bucket))
            results = {name: run_phase(name, info, workdir, images, args) for name in ("baseline", "explained")}
        finally:
            localstack.down(workdir / "stack")
    base, cand = results["baseline"], results["explained"]
    for name, r in (("baseline  (nothing explained)", base), ("explained (every image)      ", cand)):
        say(f"{name}: verdict p50 {r['verdict_p50_ms']:.0f} ms, p99 {r['verdict_p99_ms']:.0f} ms")
    say(
        f"explanations: p50 {cand['explanation_p50_ms']:.0f} ms, p99 {cand['explanation_p99_ms']:.0f} ms after the "
        f"upload; p50 {cand['after_verdict_p50_ms']:.0f} ms after their verdict; "
        f"{cand['explained_before_verdict']} published before their verdict"
    )
    ratio = cand["verdict_p99_ms"] / max(base["verdict_p99_ms"], 1.0)
    say(f"verdict p99 explained / baseline: {ratio:.2f} (target <= {TARGET_P99_RATIO_CPU} on a 2-core CPU)")
    summary = {
        "bench": "explanations",
        "baseline": "the same paced stream with MODERATION_EXPLAIN_ABOVE=2 (nothing explained)",
        "events": args.events,
        "rate_per_s": args.rate,
        "verdict_p99_ratio": round(ratio, 3),
        "target_p99_ratio": TARGET_P99_RATIO_CPU,
        "meets_target": ratio <= TARGET_P99_RATIO_CPU,
        "baseline_ms": {k: round(v, 1) for k, v in base.items()},
        "explained_ms": {k: round(v, 1) for k, v in cand.items()},
        "request_bytes_per_image": sizes,
        "seconds": round(time.monotonic() - started, 1),
    }
    say(json.dumps(summary))
    if args.output:
        args.output.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
