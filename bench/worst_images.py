"""The worst images within the default caps through a real worker: its peak RSS and its longest event-loop stall.

One `moderation worker` process (the null detector: the model is not what is measured; default caps,
decode threads and pixel budget) on the real local stack (Tansu + SeaweedFS, started here), fed twice:
- baseline: --copies x 8 ordinary uploads (1024x768 JPEGs and PNGs), through a fresh worker;
- worst: --copies of each image below, all published before a fresh worker starts, so that they are in
  flight together: 16-bit and float 50 MP, a PNG of 200,000 private chunks, a 50 MP progressive RGB JPEG
  at the scan budget and one far over it, an animated GIF of 50 MP frames.
For each round: the worker's peak RSS (VmHWM from /proc) and the longest event-loop stall it exported
(moderation_event_loop_lag_max_seconds, from a probe task that wakes every 50 ms), read before it stops.
Targets: peak RSS below 75% of the worker's memory limit in deploy/base/worker/deployment.yaml, and no
stall over 100 ms. The last line is a JSON summary.

    python bench/worst_images.py [--copies 3] [--without-budget] [--output bench/results/worst_images-cpu.txt]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml
from prometheus_client.parser import text_string_to_metric_families

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit import hostile_images, localstack
from moderation.devkit.demo import settings_for, start_worker, stop_worker
from moderation.devkit.samples import draw_image, encode
from moderation.model import structure

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deploy/base/worker/deployment.yaml"
RSS_SHARE = 0.75
STALL_TARGET_S = 0.1
CAP = (8660, 5773)  # 49,994,180 pixels: just under MODERATION_MAX_IMAGE_PIXELS' 50 MP


def worst_images() -> dict[str, Callable[[], bytes]]:
    scans = hostile_images.progressive_jpeg((64, 64), mode="RGB").count(b"\xff\xda")
    return {
        "png-8bit-rgb-50MP": lambda: hostile_images.rgb_png(CAP),
        "png-16bit-50MP": lambda: hostile_images.sixteen_bit_png(CAP),
        "tiff-float-50MP": lambda: hostile_images.float_tiff(CAP),
        "png-200k-private-chunks": lambda: hostile_images.png_with_private_chunks(200_000),
        "jpeg-progressive-50MP-at-scan-budget": lambda: hostile_images.progressive_jpeg(
            CAP, structure.MAX_JPEG_SCANS - scans, mode="RGB"
        ),
        "jpeg-progressive-5000-scans": lambda: hostile_images.progressive_jpeg(CAP, 5000, mode="RGB"),
        "gif-animated-50MP-x4": lambda: hostile_images.animated_gif(CAP, 4),
    }


def ordinary_images() -> dict[str, Callable[[], bytes]]:
    return {
        f"{fmt.lower()}-1024x768-{seed}": (lambda fmt=fmt, seed=seed: encode(draw_image(seed, (1024, 768)), fmt))
        for fmt in ("JPEG", "PNG")
        for seed in range(4)
    }


def memory_limit_bytes() -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for document in yaml.safe_load_all(DEPLOYMENT.read_text()):
        for container in document["spec"]["template"]["spec"]["containers"]:
            limit = str(container["resources"]["limits"]["memory"])
            number, unit = re.fullmatch(r"(\d+)(Ki|Mi|Gi)", limit).groups()  # type: ignore[union-attr]
            return int(number) * units[unit]
    raise ValueError(f"no memory limit in {DEPLOYMENT}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def peak_rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024  # type: ignore[union-attr]


def loop_lag_max(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        if family.name == "moderation_event_loop_lag_max_seconds":
            return float(family.samples[0].value)
    raise KeyError("moderation_event_loop_lag_max_seconds is not exported")


@dataclass(frozen=True)
class Round:
    events: int
    seconds: float
    peak_rss_bytes: int
    loop_lag_max_s: float


def run_round(  # type: ignore[no-untyped-def]
    info, workdir: Path, images: dict[str, Callable[[], bytes]], copies: int, say: Callable[[str], None], **extra: str
) -> Round:
    suffix = uuid.uuid4().hex[:8]
    port = free_port()
    overrides = {
        "topic_uploads": f"worst-uploads-{suffix}",
        "topic_verdicts": f"worst-verdicts-{suffix}",
        "topic_flagged": f"worst-flagged-{suffix}",
        "topic_dlq": f"worst-dlq-{suffix}",
        "kafka_consumer_group": f"worst-{suffix}",
        "detector": "null",
        "cache_max_entries": "0",  # every copy decoded
        "metrics_port": str(port),
        "data_dir": str(workdir / suffix),
    } | extra
    settings = settings_for(info, **overrides)
    topics = [settings.topic_uploads, settings.topic_verdicts, settings.topic_flagged, settings.topic_dlq]
    asyncio.run(localstack.create_topics(info.kafka_bootstrap, topics, settings.kafka_topic_partitions))
    paths, kinds = [], {}
    for name, make in images.items():
        data = make()
        assert len(data) <= settings.s3_max_object_bytes, f"{name} is over the object cap"
        for copy in range(copies):
            (path := workdir / f"{suffix}-{copy}-{name}").write_bytes(data)
            paths.append(path)
    events = asyncio.run(upload_images(settings, paths, bucket=info.bucket))
    for event in events:
        kinds[event.event_id] = Path(event.key).name.split("-", 2)[2]
    asyncio.run(publish(settings, [event_message(e) for e in events]))  # all waiting before the worker starts
    env = info.env() | {f"MODERATION_{k.upper()}": v for k, v in overrides.items()}
    worker = start_worker(env, workdir / f"worker-{suffix}.log")
    started = time.monotonic()
    try:
        outcomes = asyncio.run(read_outcomes(settings, set(kinds), timeout_s=900))
        seconds = time.monotonic() - started
        rss, lag = peak_rss(worker.pid), loop_lag_max(port)
    finally:
        stop_worker(worker)
    for line in (workdir / f"worker-{suffix}.log").read_text(errors="replace").splitlines():
        if "event loop stalled" in line:
            say(f"  worker log: {line.strip()[:200]}")
    results: dict[str, Counter[str]] = {name: Counter() for name in images}
    decode_ms: dict[str, float] = {}
    for event_id, name in kinds.items():
        if verdicts := outcomes.verdicts.get(event_id):
            results[name]["verdict"] += 1
            decode_ms[name] = max(decode_ms.get(name, 0.0), verdicts[0].timings.decode_ms)
        for letter in outcomes.dead_letters.get(event_id, []):
            results[name][f"dead letter {letter.reason}"] += 1
    for name, counts in results.items():
        slowest = f", slowest decode {decode_ms[name] / 1000:.1f} s" if name in decode_ms else ""
        say(f"  {name}: {dict(counts)}{slowest}")
    return Round(len(kinds), round(seconds, 1), rss, lag)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--copies", type=int, default=3, help="uploads of each image, in flight together")
    parser.add_argument("--without-budget", action="store_true", help="a third round with the pixel budget lifted")
    parser.add_argument("--output", type=Path, help="also write everything printed to this file")
    args = parser.parse_args()
    limit = memory_limit_bytes()
    lines: list[str] = []

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        info = localstack.up(workdir / "stack", with_triton=False)
        try:
            say(f"# baseline: {args.copies} x 8 ordinary 1024x768 uploads")
            baseline = run_round(info, workdir, ordinary_images(), args.copies, say)
            say(f"baseline: {json.dumps(asdict(baseline))}")
            say(f"# worst: {args.copies} x each image within the default caps, in flight together")
            worst = run_round(info, workdir, worst_images(), args.copies, say)
            say(f"worst: {json.dumps(asdict(worst))}")
            if args.without_budget:
                say("# the same, the pixel budget lifted (MODERATION_DECODE_BUDGET_MIB=1048576): what it prevents")
                lifted = run_round(info, workdir, worst_images(), args.copies, say, decode_budget_mib="1048576")
                say(f"worst without the budget: {json.dumps(asdict(lifted))}")
        finally:
            localstack.down(workdir / "stack")
    rss_target = RSS_SHARE * limit
    summary = {
        "bench": "worst_images",
        "memory_limit_mib": limit // 2**20,
        "baseline_peak_rss_mib": round(baseline.peak_rss_bytes / 2**20),
        "worst_peak_rss_mib": round(worst.peak_rss_bytes / 2**20),
        "rss_ratio": round(worst.peak_rss_bytes / baseline.peak_rss_bytes, 2),
        "rss_target_mib": round(rss_target / 2**20),
        "baseline_loop_lag_max_s": round(baseline.loop_lag_max_s, 4),
        "worst_loop_lag_max_s": round(worst.loop_lag_max_s, 4),
        "stall_target_s": STALL_TARGET_S,
        "meets_rss_target": worst.peak_rss_bytes < rss_target,
        "meets_stall_target": worst.loop_lag_max_s <= STALL_TARGET_S,
    }
    if args.without_budget:
        summary["without_budget_peak_rss_mib"] = round(lifted.peak_rss_bytes / 2**20)
    say(json.dumps(summary))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
