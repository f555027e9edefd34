"""`moderation demo`: the whole flow on the embedded local stack, start to finish, in one command."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import boto3
from rich.console import Console
from rich.table import Table

from moderation.client import Outcomes, event_message, publish, read_outcomes, upload_images
from moderation.devkit import localstack
from moderation.devkit.checkpoints import default_checkpoint
from moderation.devkit.samples import bad_uploads
from moderation.devkit.synthetic import write_images
from moderation.settings import Settings
from moderation.worker.storage import s3_client_args

TRAINED_MODEL_NOTE = (
    "The demo serves the tiny FakeVLM this project trains on its own synthetic images (checkerboard and "
    "grid fingerprints of image generators, named fake-*/real-* by their truth): its verdicts and "
    "explanations on them are meaningful, but it knows nothing about real photographs or real generators. "
    "For real verdicts serve the released weights: `moderation demo --model lingcco/fakeVLM` (or a local directory) "
    "(see the README, 'Using the real FakeVLM weights')."
)
RANDOM_MODEL_NOTE = (
    "No trained tiny checkpoint was found (`moderation model train-tiny` builds it), so the demo serves a "
    "tiny FakeVLM-shaped model with RANDOM weights: its verdicts exercise every code path but mean nothing."
)
DEMO_SEED = 20261127  # held out: the trained model never saw these images


def settings_for(info: localstack.StackInfo, **overrides: str) -> Settings:
    values = {k.removeprefix("MODERATION_").lower(): v for k, v in info.env().items()}
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def start_worker(env: dict[str, str], log_file: Path) -> subprocess.Popen[bytes]:
    """`moderation worker` in its own process, as production runs it."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "moderation", "worker"],
            env=os.environ | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_worker(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return process.returncode


def put_objects(settings: Settings, bucket: str, objects: dict[str, bytes]) -> None:
    s3 = boto3.client("s3", **s3_client_args(settings))
    for key, data in objects.items():
        s3.put_object(Bucket=bucket, Key=key, Body=data)


def run_demo(workdir: Path, checkpoint: str | Path | None, console: Console, images: int = 12) -> bool:
    workdir.mkdir(parents=True, exist_ok=True)
    given = checkpoint is not None
    if checkpoint is None:
        checkpoint, trained = default_checkpoint(workdir)
    note = f"Model: {checkpoint}" if given else TRAINED_MODEL_NOTE if trained else RANDOM_MODEL_NOTE
    console.print(f"[bold]Bringing up the local stack[/] in {workdir / 'stack'} (Tansu, SeaweedFS, Triton)")
    info = localstack.up(
        workdir / "stack",
        model_repository=localstack.model_repository_for(workdir, checkpoint),
        progress=console.log,
    )
    worker = None
    try:
        settings = settings_for(info, kafka_consumer_group=f"demo-{uuid.uuid4().hex[:8]}")
        samples = write_images(workdir / "samples", images, DEMO_SEED)
        events = asyncio.run(upload_images(settings, samples, bucket=info.bucket, tenant="demo"))
        bad = bad_uploads(info.bucket)
        for case in bad:
            put_objects(settings, info.bucket, case.objects)
        messages = [event_message(e) for e in events] + [c.message for c in bad]
        asyncio.run(publish(settings, messages))
        console.print(f"Published {len(events)} image uploads and {len(bad)} bad messages to {settings.topic_uploads}")
        worker = start_worker(
            info.env() | {"MODERATION_KAFKA_CONSUMER_GROUP": settings.kafka_consumer_group},
            workdir / "worker.log",
        )
        expected = {e.event_id for e in events} | {c.event_id for c in bad if c.event_id}
        anonymous = sum(1 for c in bad if c.event_id is None)
        with console.status("Waiting for every event's outcome") as status:
            outcomes = asyncio.run(
                read_outcomes(settings, expected, expected_anonymous=anonymous, on_progress=_progress(status.update))
            )
        console.print(outcome_table(outcomes, {c.event_id: c.name for c in bad if c.event_id}))
        missing = expected - outcomes.decided()
        if missing:
            console.print(f"[red]{len(missing)} events got no outcome[/]; worker log: {workdir / 'worker.log'}")
        console.print(truth_line(outcomes))
        console.print(f"[yellow]Note:[/] {note}")
        return not missing
    finally:
        if worker is not None:
            stop_worker(worker)
        localstack.down(workdir / "stack")
        console.print("Local stack stopped.")


def truth_line(outcomes: Outcomes) -> str:
    """How many verdicts match the truth the sample's file name carries (fake-*.png / real-*.png)."""
    judged = [
        v[-1] for v in outcomes.verdicts.values() if v[-1].attributes.get("filename", "")[:5] in ("fake-", "real-")
    ]
    right = sum(v.label == v.attributes["filename"][:4] for v in judged)
    return f"Verdicts matching the truth in the file name: {right} of {len(judged)}"


def outcome_table(outcomes: Outcomes, names: dict[str, str]) -> Table:
    table = Table(title="Outcomes, one per upload event")
    for column in ("event", "label", "P(fake)", "action", "explanation / dead-letter reason"):
        table.add_column(column)
    for event_id, verdicts in sorted(outcomes.verdicts.items()):
        v = verdicts[-1]
        text = (v.explanation or "(no explanation: below MODERATION_EXPLAIN_ABOVE)")[:70]
        table.add_row(v.attributes.get("filename") or event_id, v.label, f"{v.score:.3f}", v.action, text)
    for letter_id, letters in sorted(outcomes.dead_letters.items(), key=lambda item: str(item[0])):
        for letter in letters[-1:] if letter_id else letters:
            name = names.get(letter_id or "") or letter_id or "(unparseable)"
            table.add_row(name, "-", "-", "dead letter", f"[red]{letter.reason}[/]: {letter.detail[:60]}")
    return table


def _progress(update: Callable[[str], object]) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        update(f"Waiting for outcomes: {done}/{total}")

    return report
