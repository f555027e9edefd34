"""The stream worker against a bare consume -> S3 GET -> produce loop, on the same real local stack.

Both run as their own process against the same Tansu (Kafka protocol) and SeaweedFS (S3), started here
with `localstack.up(with_triton=False)` in a temporary directory:
- candidate: `moderation worker` with MODERATION_DETECTOR=null (a detector that costs nothing) and the
  verdict cache off, so every event is parsed, fetched, hashed, decoded, preprocessed, "detected",
  turned into a verdict, published and committed;
- baseline: aiokafka consumer -> aiobotocore GET -> aiokafka producer (acks=all), batches filled like
  the worker's `take(batch_size, within=batch_wait_s)`, the batch's GETs and sends concurrent, offsets
  committed after every send was acknowledged. No validation, no decoding, no model. It runs on the
  worker's event loop (MODERATION_EVENT_LOOP, uvloop by default).
Throughput: a backlog of --events uploads, rate = (n - 1) / (last - first output's broker timestamp).
Latency: --paced-events uploads published at a steady rate (half the slower system's throughput unless
--rate), latency = output timestamp - upload timestamp, p50 and p99. The images are --size JPEGs
(FakeVLM's own 336x336 by default, so decoding stays a small part of the work the bare loop skips).
The last line is a JSON summary; `ratio` = worker events/s / bare events/s (target >= 0.7).

    python bench/pipeline.py [--events 2000] [--paced-events 500] [--size 336x336] [--rate R]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from moderation.adapters.kafka import aiokafka_options
from moderation.adapters.s3 import s3_client_args
from moderation.client import event_message, publish, upload_images
from moderation.devkit import localstack
from moderation.devkit.demo import settings_for, stop_worker
from moderation.devkit.lanes import Lane, open_lane
from moderation.devkit.samples import draw_image, encode
from moderation.events import UploadEvent
from moderation.model.imaging import prepare
from moderation.settings import Settings

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_stages import Recording, table  # a sibling script, not a package

TARGET_RATIO = 0.7
DISTINCT_IMAGES = 64


# The baseline: the least a consume -> fetch -> produce service must do, with the worker's batching.


def bare_loop_process(values: dict[str, Any], stop: Any) -> None:
    settings = Settings(**values)
    if settings.event_loop == "uvloop":  # the worker's own event loop, so that the loop is no difference
        import uvloop

        uvloop.run(bare_loop(settings, stop.is_set))
    else:
        asyncio.run(bare_loop(settings, stop.is_set))


async def bare_loop(settings: Settings, stopped: Callable[[], bool]) -> None:
    consumer = AIOKafkaConsumer(
        settings.topic_uploads,
        group_id=settings.kafka_consumer_group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        rebalance_timeout_ms=int(settings.kafka_rebalance_timeout_s * 1000),
        session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_s * 1000),
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,  # as the worker's consumer: Tansu waits it out
        **aiokafka_options(settings),
    )
    producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
    await consumer.start()
    await producer.start()
    try:
        async with get_session().create_client("s3", **s3_client_args(settings, AioConfig)) as s3:

            async def one(value: bytes, key: bytes | None) -> None:
                event = json.loads(value)
                response = await s3.get_object(Bucket=event["bucket"], Key=event["key"])
                async with response["Body"] as body:
                    data = await body.read()
                out = {"event_id": event["event_id"], "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
                await (await producer.send(settings.topic_verdicts, key=key, value=json.dumps(out).encode()))

            while not stopped():
                batch = await take(consumer, settings.batch_size, settings.batch_wait_s)
                if batch:
                    await asyncio.gather(*(one(r.value, r.key) for r in batch))
                    await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()


async def take(consumer: AIOKafkaConsumer, size: int, within: float) -> list[Any]:
    """Up to `size` records, waiting at most `within` s after the first one (Faust's stream.take)."""
    records: list[Any] = []
    deadline: float | None = None
    while len(records) < size:
        wait = 0.5 if deadline is None else deadline - time.monotonic()
        if wait <= 0:
            break
        fetched = await consumer.getmany(timeout_ms=max(1, int(wait * 1000)), max_records=size - len(records))
        records += [r for part in fetched.values() for r in part]
        if deadline is None:
            if not records:
                return records
            deadline = time.monotonic() + within
    return records


# Driving either system and reading what it produced.


async def publish_paced(settings: Settings, events: list[UploadEvent], rate: float) -> None:
    producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
    await producer.start()
    try:
        started, pending = time.monotonic(), []
        for i, event in enumerate(events):
            delay = started + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            key, value = event_message(event)
            pending.append(await producer.send(settings.topic_uploads, key=key, value=value))
        await asyncio.gather(*pending)
    finally:
        await producer.stop()


async def timestamps(
    settings: Settings, topic: str, keys: set[bytes], timeout_s: float, values: dict[bytes, bytes] | None = None
) -> dict[bytes, int]:
    """Broker timestamp (ms) of the first record with each key, read from the start of `topic`."""
    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings))
    await consumer.start()
    found: dict[bytes, int] = {}
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not keys <= set(found):
            for part in (await consumer.getmany(timeout_ms=500)).values():
                for record in part:
                    if record.key in keys and record.key not in found:
                        found[record.key] = record.timestamp
                        if values is not None:
                            values[record.key] = record.value
    finally:
        await consumer.stop()
    missing = len(keys - set(found))
    if missing:
        raise RuntimeError(f"{missing} of {len(keys)} events got no output on {topic} within {timeout_s:.0f} s")
    return found


def events_for(template: list[UploadEvent], count: int, tag: str) -> list[UploadEvent]:
    return [template[i % len(template)].model_copy(update={"event_id": f"{tag}-{i}"}) for i in range(count)]


class System:
    """Start, drive and stop one of the two systems on a fresh lane."""

    def __init__(self, name: str, info: localstack.StackInfo, workdir: Path, images: list[UploadEvent]) -> None:
        self.name, self.info, self.workdir, self.images = name, info, workdir, images
        self.cpu_ms: dict[str, float] = {}  # CPU ms per event of the backlog phase, by stage
        self.threads_ms: dict[str, float] = {}  # the same, by thread name
        self.profile_dir: Path | None = None

    def run(self, backlog: int, paced: int, rate: float | None, timeout_s: float) -> dict[str, float]:
        workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=self.workdir))
        extra = {"detector": "null", "cache_max_entries": "0", "metrics_port": "0"}
        current = open_lane(self.info, workdir, prefix="bench-", own_bucket=False, **extra)
        settings, result = current.settings, {}
        warm = events_for(self.images, 1, f"{self.name}-warm-{uuid.uuid4().hex[:6]}")
        stop, pid = self._start(current)
        try:
            asyncio.run(publish(settings, [event_message(e) for e in warm]))  # waits out the group join
            asyncio.run(timestamps(settings, settings.topic_verdicts, {warm[0].event_id.encode()}, timeout_s))
            if backlog:
                events = events_for(self.images, backlog, f"{self.name}-backlog")
                keys = {e.event_id.encode() for e in events}
                values: dict[bytes, bytes] = {}
                keep = self.profile_dir / f"{self.name}.pyspy.txt" if self.profile_dir else None
                recording = Recording(pid, keep)
                recording.start()
                try:
                    asyncio.run(publish(settings, [event_message(e) for e in events]))
                    stamps = asyncio.run(timestamps(settings, settings.topic_verdicts, keys, timeout_s, values))
                finally:
                    recording.stop()
                self.cpu_ms = recording.per_event_ms(backlog)
                self.threads_ms = recording.threads_ms(backlog)
                out = sorted(stamps.values())
                result["events_per_s"] = (len(out) - 1) / max((out[-1] - out[0]) / 1000, 1e-3)
                result |= _median_timings(values.values())
            if paced and rate:
                events = events_for(self.images, paced, f"{self.name}-paced")
                keys = {e.event_id.encode() for e in events}
                asyncio.run(publish_paced(settings, events, rate))
                sent = asyncio.run(timestamps(settings, settings.topic_uploads, keys, timeout_s))
                done = asyncio.run(timestamps(settings, settings.topic_verdicts, keys, timeout_s))
                latencies = sorted(done[k] - sent[k] for k in keys)
                result["p50_ms"] = float(statistics.median(latencies))
                result["p99_ms"] = float(latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))])
        finally:
            stop()
        return result

    def _start(self, current: Lane) -> tuple[Callable[[], None], int]:
        """Start the system; how to stop it, and its process id."""
        if self.name == "worker":
            process = current.worker()

            def halt_worker() -> None:
                stop_worker(process)

            return halt_worker, process.pid
        context = multiprocessing.get_context("spawn")
        stop = context.Event()
        values = current.settings.model_dump()
        values["s3_secret_access_key"] = current.settings.s3_secret_access_key.get_secret_value()  # type: ignore[union-attr]
        bare = context.Process(target=bare_loop_process, args=(values, stop), daemon=True)
        bare.start()

        def halt() -> None:
            stop.set()
            bare.join(30)
            if bare.is_alive():
                bare.kill()

        assert bare.pid is not None
        return halt, bare.pid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=2000, help="backlog for the throughput phase")
    parser.add_argument("--paced-events", type=int, default=500, help="events for the latency phase (0: skip)")
    parser.add_argument("--rate", type=float, help="events/s of the latency phase (default: half the slower)")
    parser.add_argument("--size", default="336x336", help="WxH of the JPEG uploads")
    parser.add_argument("--timeout", type=float, default=600.0)
    parser.add_argument("--profile-dir", type=Path, help="leave py-spy's raw samples of each system here")
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    started, load_before = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="bench-pipeline-") as tmp:
        workdir = Path(tmp)
        files = []
        for i in range(DISTINCT_IMAGES):
            path = workdir / f"upload-{i:03d}.jpg"
            path.write_bytes(encode(draw_image(i, (width, height)), "JPEG"))
            files.append(path)
        data = files[0].read_bytes()
        prepare_ms = min(_timed(lambda: prepare(data, max_pixels=10**8)) for _ in range(20)) * 1000
        print(
            f"# pipeline: {DISTINCT_IMAGES} distinct {width}x{height} JPEGs, ~{len(data)} bytes each; "
            f"prepare() (hash + decode + preprocess) {prepare_ms:.2f} ms per image, which the bare loop skips"
        )
        info = localstack.up(workdir / "stack", with_triton=False)
        try:
            event_loop = settings_for(info).event_loop
            print(f"# event loop, worker and bare loop alike: {event_loop}")
            images = asyncio.run(upload_images(settings_for(info), files, bucket=info.bucket))
            systems = {name: System(name, info, workdir, images) for name in ("bare", "worker")}
            for system in systems.values():
                system.profile_dir = args.profile_dir
            results = {name: system.run(args.events, 0, None, args.timeout) for name, system in systems.items()}
            for name, result in results.items():
                inside = ", ".join(f"{k.removeprefix('median_')} {v:.1f}" for k, v in result.items() if "median_" in k)
                print(
                    f"{name:<7} backlog {args.events}: {result['events_per_s']:8.1f} events/s"
                    + (f"  (per event, median ms: {inside})" if inside else "")
                )
            cpu_ms = {name: system.cpu_ms for name, system in systems.items()}
            print("\n".join(table(cpu_ms)))
            threads_ms = {name: system.threads_ms for name, system in systems.items()}
            for name, ms in threads_ms.items():
                print(f"# {name} CPU ms per event, by thread: " + ", ".join(f"{t} {v:.2f}" for t, v in ms.items()))
            rate = args.rate or 0.5 * min(r["events_per_s"] for r in results.values())
            if args.paced_events:
                for name, system in systems.items():
                    results[name] |= system.run(0, args.paced_events, rate, args.timeout)
                    r = results[name]
                    print(f"{name:<7} paced at {rate:.0f}/s: p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms")
        finally:
            localstack.down(workdir / "stack")
    bare, worker = results["bare"], results["worker"]
    ratio = worker["events_per_s"] / bare["events_per_s"]
    print(f"worker / bare loop: {ratio:.2f} (target >= {TARGET_RATIO})")
    summary = {
        "bench": "pipeline",
        "baseline": "aiokafka consume -> aiobotocore GET -> aiokafka produce, same batching",
        "event_loop": event_loop,
        "baseline_events_per_s": round(bare["events_per_s"], 1),
        "events_per_s": round(worker["events_per_s"], 1),
        "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
        "paced_rate_events_per_s": round(rate, 1) if args.paced_events else None,
        "latency_ms": {
            name: {k: round(r[k], 1) for k in ("p50_ms", "p99_ms") if k in r} for name, r in results.items()
        },
        "worker_timings_median_ms": {
            k.removeprefix("median_"): round(v, 2) for k, v in worker.items() if "median_" in k
        },
        "cpu_ms_per_event": cpu_ms,
        "cpu_ms_per_event_by_thread": threads_ms,
        "events": args.events,
        "image": f"{width}x{height} JPEG",
        "prepare_ms": round(prepare_ms, 2),
        "seconds": round(time.monotonic() - started, 1),
        "load_average_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }
    print(json.dumps(summary))
    return 0


def _median_timings(values: Any) -> dict[str, float]:
    """The worker's own per-event timings (Verdict.timings), medians; the bare loop's outputs have none."""
    timings = [json.loads(v).get("timings") for v in values]
    if not all(timings):
        return {}
    return {f"median_{k}": float(statistics.median(t[k] for t in timings)) for k in timings[0]}


def _timed(fn: Callable[[], object]) -> float:
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


if __name__ == "__main__":
    sys.exit(main())
