"""`moderation demo`: the whole flow on the embedded local stack, start to finish, in one command."""

from __future__ import annotations

import asyncio
import io
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
from PIL import Image
from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from moderation.adapters.kafka import reader
from moderation.adapters.s3 import s3_client_args
from moderation.client import Outcomes, event_message, publish, read_explanations, read_outcomes, upload_images
from moderation.devkit import localstack, provenance_samples
from moderation.devkit.checkpoints import default_checkpoint
from moderation.devkit.samples import bad_uploads
from moderation.devkit.synthetic import write_images
from moderation.events import DeadLetter, Decision, Verdict
from moderation.settings import Settings

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
# The demo's file names and bad cases' names fit whole; an event id beyond it is ellipsized.
EVENT_WIDTH = 24


def settings_for(info: localstack.StackInfo, **overrides: str) -> Settings:
    values = {k.removeprefix("MODERATION_").lower(): v for k, v in info.env().items()}
    return Settings(**(values | overrides))  # type: ignore[arg-type]


def start_worker(env: dict[str, str], log_file: Path, role: str = "worker") -> subprocess.Popen[bytes]:
    """`moderation worker` (or another role: `explainer`) in its own process, as production runs it."""
    with log_file.open("ab") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "moderation", role],
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


def run_demo(
    workdir: Path, checkpoint: str | Path | None, console: Console, images: int = 12, *, keep_stack: bool = False
) -> bool:
    """The demo's own lines and tables on `console`; what the libraries log goes to workdir/demo.log."""
    workdir.mkdir(parents=True, exist_ok=True)
    with logs_to(workdir / "demo.log"):
        return _demo(workdir, checkpoint, console, images, keep_stack=keep_stack)


@contextmanager
def logs_to(path: Path) -> Iterator[None]:
    """Route every log record and warning of this process to `path` while the demo runs, then restore.

    The command's root handler writes to the terminal, where aiokafka's INFO lines would land between the
    demo's tables.
    """
    root = logging.getLogger()
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    handlers, level = root.handlers[:], root.level
    root.handlers = [handler]
    root.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        root.handlers = handlers
        root.setLevel(level)
        handler.close()


def _demo(workdir: Path, checkpoint: str | Path | None, console: Console, images: int, *, keep_stack: bool) -> bool:
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
    worker = explainer = None
    try:
        settings = settings_for(info, kafka_consumer_group=f"demo-{uuid.uuid4().hex[:8]}")
        samples = [*write_images(workdir / "samples", images, DEMO_SEED), ai_signed_sample(workdir / "samples")]
        events = asyncio.run(upload_images(settings, samples, bucket=info.bucket, tenant="demo"))
        bad = bad_uploads(info.bucket)
        for case in bad:
            put_objects(settings, info.bucket, case.objects)
        messages = [event_message(e) for e in events] + [c.message for c in bad]
        asyncio.run(publish(settings, messages))
        console.print(f"Published {len(events)} image uploads and {len(bad)} bad messages to {settings.topic_uploads}")
        env = info.env() | {"MODERATION_KAFKA_CONSUMER_GROUP": settings.kafka_consumer_group}
        worker = start_worker(env, workdir / "worker.log")
        # Its own /metrics would want the worker's port: the demo reads topics, not metrics.
        explainer = start_worker(env | {"MODERATION_METRICS_PORT": "0"}, workdir / "explainer.log", "explainer")
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
        explained = explanations_round(settings, outcomes, console)
        copied = review_round(settings, info.bucket, outcomes, workdir / "samples", console)
        console.print(f"[yellow]Note:[/] {note}")
        return not missing and explained and copied
    finally:
        for process in (worker, explainer):
            if process is not None:
                stop_worker(process)
        console_line = f"moderation review serve --env-file {workdir / 'stack' / 'stack.env'}"
        if keep_stack:
            console.print(f"The stack stays up. Review the queue in a browser: [bold]{console_line}[/]")
            console.print(f"Stop it with: moderation dev down --run-dir {workdir / 'stack'}")
        else:
            localstack.down(workdir / "stack")
            console.print(
                "Local stack stopped. To open the review console on it, rerun with --keep-stack, then: " + console_line
            )


def explanations_round(settings: Settings, outcomes: Outcomes, console: Console) -> bool:
    """The explanations the verdicts asked for, as the explainer publishes them after their verdicts."""
    wanted = {event_id for event_id, v in outcomes.verdicts.items() if v[-1].explanation_requested}
    if not wanted:
        return True
    with console.status(f"Waiting for {len(wanted)} explanations from the explainer"):
        explained, failed = asyncio.run(read_explanations(settings, wanted, timeout_s=180))
    title = "Explanations, published after their verdicts (moderation.explanations)"
    table = _narrow_table(title, "verdict", "after", "explanation")
    for event_id in sorted(wanted):
        verdict = outcomes.verdicts[event_id][-1]
        name = verdict.attributes.get("filename") or event_id
        if (e := explained.get(event_id)) is not None:
            after = f"{(e.explained_at - e.verdict_decided_at).total_seconds():.1f} s"
            table.add_row(name, f"{verdict.label} {verdict.score:.3f}", after, _preview(e.explanation, 70))
        elif (letter := failed.get(event_id)) is not None:
            table.add_row(name, verdict.label, "-", _why_dead(letter))
        else:
            table.add_row(name, verdict.label, "-", Text("(none within 180 s)", "red"))
    console.print(table)
    return wanted <= set(explained)


def ai_signed_sample(directory: Path) -> Path:
    """A JPEG whose C2PA manifest declares it AI-generated (signed with a test certificate made here)."""
    data = provenance_samples.sample_image("JPEG", (480, 360), seed=DEMO_SEED % 1000)
    path = directory / "c2pa-ai-generated.jpg"
    path.write_bytes(provenance_samples.signed(data, "JPEG", provenance_samples.TRAINED_ALGORITHMIC_MEDIA))
    return path


def review_round(settings: Settings, bucket: str, outcomes: Outcomes, samples: Path, console: Console) -> bool:
    """A reviewer confirms one flagged fake; a re-encoded, shrunk copy of it is then uploaded and matched."""
    fakes = [
        v[-1]
        for v in outcomes.verdicts.values()
        if v[-1].attributes.get("filename", "").startswith("fake-") and (v[-1].image.pdq_quality or 0) >= 60
    ]
    if not fakes:
        console.print("No fake sample with a PDQ hash good enough to bank: the near-duplicate step is skipped.")
        return True
    banked = max(fakes, key=lambda v: v.image.pdq_quality or 0)
    decision = Decision.about(banked, "confirm_fake", "demo-reviewer")
    asyncio.run(publish(settings, [(decision.event_id.encode(), decision.to_bytes())], topic=settings.topic_decisions))
    name = banked.attributes.get("filename", banked.event_id)
    console.print(f"A reviewer (demo-reviewer) confirmed {name} as fake; the worker banks the decision.")
    if not asyncio.run(_banked(settings, banked.image_sha256)):
        console.print("[red]The decision was not banked within 60 s[/]")
        return False
    copy = samples / f"copy-of-{Path(name).stem}.jpg"
    copy.write_bytes(_reencoded((samples / name).read_bytes()))
    [event] = asyncio.run(upload_images(settings, [copy], bucket=bucket, tenant="demo"))
    asyncio.run(publish(settings, [event_message(event)]))
    again = asyncio.run(read_outcomes(settings, {event.event_id}, timeout_s=120))
    console.print(outcome_table(again, {}))
    verdict = again.verdicts[event.event_id][-1] if event.event_id in again.verdicts else None
    return verdict is not None and verdict.decided_by == "match"


def _reencoded(data: bytes) -> bytes:
    """JPEG quality 70 at 75% of the size: what a re-upload after a platform's own processing looks like."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    small = image.resize((image.width * 3 // 4, image.height * 3 // 4))
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=70)
    return out.getvalue()


async def _banked(settings: Settings, sha256: str, timeout_s: float = 60.0) -> bool:
    consumer = reader(settings, settings.topic_bank)
    await consumer.start()
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                if any(r.key == sha256.encode() for r in records):
                    await asyncio.sleep(2)  # the worker's own bank follower reads it too
                    return True
    finally:
        await consumer.stop()
    return False


def truth_line(outcomes: Outcomes) -> str:
    """How many verdicts match the truth the sample's file name carries (fake-*.png / real-*.png)."""
    judged = [
        v[-1] for v in outcomes.verdicts.values() if v[-1].attributes.get("filename", "")[:5] in ("fake-", "real-")
    ]
    right = sum(v.label == v.attributes["filename"][:4] for v in judged)
    return f"Verdicts matching the truth in the file name: {right} of {len(judged)}"


def outcome_table(outcomes: Outcomes, names: dict[str, str]) -> Table:
    """One row per event, within 80 columns: who decided and why wrap inside the last column."""
    table = _narrow_table("Outcomes, one per upload event", "verdict", "action", "decided by: why")
    for event_id, verdicts in sorted(outcomes.verdicts.items()):
        v = verdicts[-1]
        why = Text.assemble(_decided_by(v), "\n", (_preview(v.explanation or _no_explanation(v), 70), "dim"))
        table.add_row(v.attributes.get("filename") or event_id, f"{v.label} {v.score:.3f}", v.action, why)
    for letter_id, letters in sorted(outcomes.dead_letters.items(), key=lambda item: str(item[0])):
        for letter in letters[-1:] if letter_id else letters:
            name = names.get(letter_id or "") or letter_id or "(unparseable)"
            table.add_row(name, "dead letter", "-", _why_dead(letter))
    return table


def _narrow_table(title: str, *columns: str) -> Table:
    # No vertical rules and no outer padding: an 80-column terminal keeps the room for the text.
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    table.add_column("event", no_wrap=True, overflow="ellipsis", max_width=EVENT_WIDTH)
    for column in columns[:-1]:
        table.add_column(column, no_wrap=True)
    table.add_column(columns[-1], overflow="fold")
    return table


def _why_dead(letter: DeadLetter) -> Text:
    return Text.assemble((letter.reason, "red"), ": ", _preview(letter.detail, 60))


def _preview(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _no_explanation(verdict: Verdict) -> str:
    if verdict.explanation_requested:
        return "(explanation to follow: below)"
    return "(no explanation: below MODERATION_EXPLAIN_ABOVE)"


def _decided_by(verdict: Verdict) -> str:
    if verdict.decided_by == "provenance" and verdict.provenance is not None:
        return "provenance (C2PA)" if verdict.provenance.c2pa is not None else "provenance (IPTC)"
    if verdict.match is not None and verdict.decided_by in ("match", "review"):
        return f"{verdict.decided_by} (PDQ distance {verdict.match.distance})"
    return verdict.decided_by


def _progress(update: Callable[[str], object]) -> Callable[[int, int], None]:
    def report(done: int, total: int) -> None:
        update(f"Waiting for outcomes: {done}/{total}")

    return report
