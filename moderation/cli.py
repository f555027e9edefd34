"""The `moderation` command: worker, local stack, demo, publishing, schemas and settings."""

from __future__ import annotations

import asyncio
import json
import logging
import logging.config
import re
from collections.abc import Coroutine
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from moderation.errors import Reason
from moderation.events import json_schemas
from moderation.settings import Settings, env_table

if TYPE_CHECKING:
    from moderation.model.detectors import InProcessDetector, TritonDetector
    from moderation.worker.hashlists import ListFormat

_T = TypeVar("_T")

app = typer.Typer(help="Spot AI-generated images in an upload stream with FakeVLM.", no_args_is_help=True)
dev = typer.Typer(help="The embedded local stack: Tansu (Kafka), SeaweedFS (S3), Triton.", no_args_is_help=True)
model = typer.Typer(help="Model checkpoints.", no_args_is_help=True)
dlq = typer.Typer(help="The dead-letter topic: inspect and replay.", no_args_is_help=True)
app.add_typer(dev, name="dev")
app.add_typer(dlq, name="dlq")
app.add_typer(model, name="model")
review = typer.Typer(help="The review console for trust-and-safety reviewers.", no_args_is_help=True)
app.add_typer(review, name="review")
console = Console()

DEFAULT_HOME = Path(".moderation")
EnvFile = Annotated[Path | None, typer.Option("--env-file", help="KEY=VALUE file, e.g. a stack's stack.env.")]
RunDir = Annotated[Path, typer.Option("--run-dir", help="Where the stack keeps its state and logs.")]
Checkpoint = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--checkpoint",
        help="FakeVLM weights: a local directory, or a hub id such as lingcco/fakeVLM from the Hugging Face cache.",
    ),
]


def load_settings(env_file: Path | None) -> Settings:
    return Settings(_env_file=env_file) if env_file else Settings()  # type: ignore[call-arg]


@app.command()
def worker(env_file: EnvFile = None) -> None:
    """Run the stream worker (a Faust app) until SIGTERM or Ctrl-C."""
    from moderation.errors import ModerationError
    from moderation.logs import logging_config
    from moderation.worker import tracing
    from moderation.worker.app import create_app
    from moderation.worker.crashonly import Worker

    settings = load_settings(env_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # the policy: Faust's consumer thread makes its own loop, uvloop too
    try:
        tracing.configure()
        worker_app = create_app(settings)
    except ModerationError as exc:  # a configuration it cannot run with: nothing to restart into
        console.print(f"[red]error:[/] {escape(str(exc))}")  # "[model]" is no markup
        raise typer.Exit(2) from exc
    Worker(
        worker_app,
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        quiet=True,
        shutdown_grace_s=settings.shutdown_grace_s,
    ).execute_from_commandline()


@app.command()
def explainer(env_file: EnvFile = None) -> None:
    """Run the explainer until SIGTERM or Ctrl-C: explanations for the verdicts that asked for one."""
    from moderation.errors import ModerationError
    from moderation.logs import logging_config
    from moderation.worker.explainer import serve

    settings = load_settings(env_file)
    logging.config.dictConfig(logging_config(settings.log_level))
    try:
        if settings.event_loop == "uvloop":
            import uvloop

            uvloop.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except ModerationError as exc:  # a configuration it cannot run with: nothing to restart into
        console.print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(2) from exc


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Scratch directory for the stack and samples.")] = DEFAULT_HOME / "demo",
    checkpoint: Checkpoint = None,
    images: Annotated[int, typer.Option(min=1, help="Sample images to upload.")] = 12,
    keep_stack: Annotated[bool, typer.Option(help="Leave the stack up (for the review console).")] = False,
) -> None:
    """Bring the local stack up, push sample and bad uploads through a worker, show every outcome; then a
    reviewer's decision and a re-encoded copy of the fake it confirmed."""
    from moderation.devkit.demo import run_demo

    if not run_demo(workdir, checkpoint, console, images, keep_stack=keep_stack):
        raise typer.Exit(1)


@app.command()
def publish(
    files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False, help="Images to upload.")],
    bucket: Annotated[str | None, typer.Option(help="Bucket (default: the first allowed bucket).")] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant to put on the events.")] = None,
    env_file: EnvFile = None,
) -> None:
    """Upload local images to S3 and publish their upload events, as a platform backend would."""
    from moderation.client import event_message, publish, upload_images

    settings = load_settings(env_file)
    target = bucket or next(iter(settings.s3_allowed_buckets), None)
    if target is None:
        raise typer.BadParameter("give --bucket or set MODERATION_S3_ALLOWED_BUCKETS")
    events = asyncio.run(upload_images(settings, files, bucket=target, tenant=tenant))
    asyncio.run(publish(settings, [event_message(e) for e in events]))
    for event in events:
        console.print(f"{event.event_id}  s3://{event.bucket}/{event.key}")
    console.print(f"Published {len(events)} events to {settings.topic_uploads}.")


TritonUrl = Annotated[str | None, typer.Option("--triton", help="Score on Triton at this gRPC host:port instead.")]
Device = Annotated[str, typer.Option(help="In-process device: cpu, cuda or cuda:N.")]


class WeightsDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


Dtype = Annotated[
    WeightsDtype | None,
    typer.Option(help="In-process weights dtype (default: bfloat16 on CUDA, float32 on CPU; bfloat16 halves the RAM)."),
]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.")]
ExplainAbove = Annotated[float | None, typer.Option(help="Explain when P(fake) >= this (default: settings).")]
EmbeddingModel = Annotated[str | None, typer.Option(help="CSS model: a sentence-transformers path or cached name.")]
Predictions = Annotated[Path | None, typer.Option(help="Per-image JSONL: prediction, explanation, reference.")]


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def _detector(
    checkpoint: str | None,
    triton: str | None,
    device: str,
    dtype: WeightsDtype | None,
    batch_size: int,
    *,
    threshold: float = 0.5,
) -> InProcessDetector | TritonDetector:
    """The in-process or Triton detector of scan and eval, from their shared options: one of them is required,
    as no tool here falls back to a test model."""
    from moderation.model.detectors import InProcessDetector, TritonDetector

    if checkpoint is not None and triton is not None:
        raise typer.BadParameter("give --model or --triton, not both")
    if triton is not None:
        return TritonDetector(Settings.model_validate({"triton_url": triton}))
    return InProcessDetector(
        _required_model(checkpoint),
        device=device,
        dtype=dtype.value if dtype else None,
        batch_size=batch_size,
        threshold=threshold,
    )


def _required_model(checkpoint: str | None) -> str:
    if checkpoint is None:
        raise typer.BadParameter(
            "which weights? --model lingcco/fakeVLM (or a directory); for a plumbing run on the trained tiny "
            "test model: --model models/fakevlm-tiny-trained",
            param_hint="--model",
        )
    return checkpoint


def _run_or_exit(work: Coroutine[Any, Any, _T]) -> _T:
    """Run `work`; a ModerationError (a bad model, an unreachable Triton) is one red line and exit 1."""
    from moderation.errors import ModerationError

    try:
        return asyncio.run(work)
    except ModerationError as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}")  # "[model]" is no markup
        raise typer.Exit(1) from exc


@app.command("scan")
def scan_files(
    paths: Annotated[list[Path], typer.Argument(help="Image files and directories (searched recursively).")],
    out: Annotated[Path, typer.Option(help="JSONL: one record per file.")] = Path("results.jsonl"),
    html: Annotated[Path | None, typer.Option(help="Also write a self-contained HTML report.")] = None,
    checkpoint: Checkpoint = None,
    triton: TritonUrl = None,
    batch_size: BatchSize = 16,
    explain_above: ExplainAbove = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    env_file: EnvFile = None,
) -> None:
    """Detect AI-generated images among local files, offline; unreadable files are reported, never fatal."""
    from moderation.model.detectors import running
    from moderation.offline.results import ScanSummary
    from moderation.offline.scan import scan, summary_json
    from moderation.policy import Policy

    settings = load_settings(env_file)
    limit = settings.explain_above if explain_above is None else explain_above
    policy = Policy(settings.review_threshold, settings.flag_threshold, limit)
    detector = _detector(checkpoint, triton, device, dtype, batch_size, threshold=settings.label_threshold)

    async def run() -> ScanSummary:
        async with running(detector) as started:
            return await scan(
                paths,
                started,
                out=out,
                html=html,
                batch_size=batch_size,
                explain_above=limit,
                max_pixels=settings.max_image_pixels,
                policy=policy,
                progress=True,
                console=console,
            )

    summary = _run_or_exit(run())
    console.print_json(summary_json(summary))
    console.print(f"Wrote {out}" + (f" and {html}" if html else ""))


@app.command("eval")
def eval_set(
    data: Annotated[
        Path | None, typer.Argument(exists=True, dir_okay=False, help="FakeClue-format json (not with --decisions).")
    ] = None,
    images: Annotated[
        Path | None, typer.Option(exists=True, file_okay=False, help="Directory the json's images are in.")
    ] = None,
    decisions: Annotated[
        str | None,
        typer.Option(
            help="Instead: the model's precision per tenant by reviewer decisions, from `topic` "
            "(MODERATION_TOPIC_DECISIONS) or a JSON-lines file of Decision messages."
        ),
    ] = None,
    env_file: EnvFile = None,
    checkpoint: Checkpoint = None,
    triton: TritonUrl = None,
    embedding_model: EmbeddingModel = None,
    out: Annotated[Path, typer.Option(help="The report as JSON.")] = Path("report.json"),
    markdown: Annotated[Path | None, typer.Option(help="Also write the markdown table here.")] = None,
    html: Annotated[Path | None, typer.Option(help="Also write the report, plots included, as HTML.")] = None,
    predictions: Predictions = None,
    batch_size: BatchSize = 16,
    device: Device = "cpu",
    dtype: Dtype = None,
    free_generation: Annotated[
        bool,
        typer.Option(help="Also answer freely as FakeVLM's eval.py (slow; in-process only): the paper's figures."),
    ] = True,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Free answer length (FakeVLM's eval.py: 256).")] = 256,
    review_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Propose the lowest review threshold with this precision.")
    ] = 0.80,
    flag_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Propose the lowest flag threshold with this precision.")
    ] = 0.95,
) -> None:
    """Acc/F1 (verdict-first and, paper-comparable, free answers), ROUGE-L, CSS, ROC-AUC and thresholds; or, with
    --decisions, the model's precision per tenant against reviewer decisions."""
    if decisions is not None:
        _eval_decisions(decisions, env_file, out, markdown)
        return
    if data is None or images is None:
        raise typer.BadParameter("give DATA and --images (or --decisions)")
    from moderation.model.detectors import InProcessDetector, running
    from moderation.offline.evaluate import evaluate
    from moderation.offline.freegen import FreeAnswerer, free_answers
    from moderation.offline.report import evaluation_html
    from moderation.offline.results import Report

    detector = _detector(checkpoint, triton, device, dtype, batch_size)
    if free_generation and triton is not None:
        _warn("free generation needs the weights in this process: not run with --triton (no paper-comparable figures)")

    def answerer(started: InProcessDetector) -> FreeAnswerer:
        # The detector's own model: the verdict-first pass is over when the free one starts.
        vlm = started.vlm
        return lambda pixels: free_answers(vlm, pixels, max_new_tokens=max_new_tokens)

    async def run() -> Report:
        async with running(detector) as started:
            free = answerer(started) if free_generation and isinstance(started, InProcessDetector) else None
            return await evaluate(
                data,
                images,
                started,
                embedding_model=embedding_model,
                batch_size=batch_size,
                predictions_out=predictions,
                progress=True,
                console=console,
                free_answerer=free,
                free_max_new_tokens=max_new_tokens,
                review_precision=review_precision,
                flag_precision=flag_precision,
            )

    report = _run_or_exit(run())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=2) + "\n")
    table = report.markdown()
    if markdown is not None:
        markdown.parent.mkdir(parents=True, exist_ok=True)
        markdown.write_text(table + "\n")
    if html is not None:
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(evaluation_html(report))
    print(re.sub(r"<svg.*?</svg>\n", "", table, flags=re.DOTALL))  # the plot is for the files, not the terminal
    console.print(f"Wrote {', '.join(str(p) for p in (out, markdown, html) if p is not None)}")


def _eval_decisions(source: str, env_file: Path | None, out: Path, markdown: Path | None) -> None:
    from moderation.offline import precision

    if source == "topic":
        settings = load_settings(env_file)
        found, bad = _run_or_exit(precision.read_topic(settings))
        where = f"topic {settings.topic_decisions}"
    else:
        found, bad = precision.read_file(Path(source))
        where = source
    if bad:
        _warn(f"{bad} records are not Decision messages: skipped")
    report = precision.precision_report(found, where)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report.model_dump_json(indent=2) + "\n")
    if markdown is not None:
        markdown.write_text(report.markdown() + "\n")
    print(report.markdown())
    console.print(f"Wrote {', '.join(str(p) for p in (out, markdown) if p is not None)}")


@app.command()
def schema(
    write: Annotated[Path | None, typer.Option(help="Write one <name>.schema.json per message here.")] = None,
) -> None:
    """Print the JSON Schemas of every message (upload event, verdict, dead letter)."""
    schemas = json_schemas()
    if write is None:
        console.print_json(json.dumps(schemas))
        return
    write.mkdir(parents=True, exist_ok=True)
    for name, body in schemas.items():
        (write / f"{name}.schema.json").write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    console.print(f"Wrote {len(schemas)} schemas to {write}")


@app.command()
def asyncapi(
    as_json: Annotated[bool, typer.Option("--json", help="JSON instead of YAML.")] = False,
    write: Annotated[Path | None, typer.Option(help="Write it to this file (e.g. schemas/asyncapi.yaml).")] = None,
    env_file: Annotated[
        Path | None,
        typer.Option("--env-file", help="Describe these settings' topics (default: the settings' defaults)."),
    ] = None,
) -> None:
    """Print the AsyncAPI 3.0 document of every topic: channels, messages, keys, headers, Kafka bindings."""
    from moderation.asyncapi import default_settings, document, to_yaml

    doc = document(load_settings(env_file) if env_file else default_settings())
    text = json.dumps(doc, indent=2) + "\n" if as_json else to_yaml(doc)
    if write is None:
        print(text, end="")
        return
    write.parent.mkdir(parents=True, exist_ok=True)
    write.write_text(text)
    console.print(f"Wrote {write}")


@app.command()
def tail(
    topics: Annotated[
        list[str],
        typer.Argument(help="uploads, verdicts, flagged, dlq, cache (the settings' topics) or any topic name."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per record.")] = False,
    from_beginning: Annotated[
        bool, typer.Option("--from-beginning", help="From the oldest record kept, not from the end.")
    ] = False,
    tenant: Annotated[list[str] | None, typer.Option(help="Only records of this tenant (repeatable).")] = None,
    action: Annotated[
        list[str] | None, typer.Option(help="Only verdicts with this action (allow, review, flag).")
    ] = None,
    reason: Annotated[list[Reason] | None, typer.Option(help="Only dead letters with this reason code.")] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after showing this many records.")] = None,
    env_file: EnvFile = None,
) -> None:
    """Follow topics and show each record readably (or as JSON lines); never commits, never moves a group."""
    from moderation.offline import tail as tailing

    logging.getLogger("aiokafka").setLevel(logging.WARNING)  # its assignment chatter is not the records
    settings = load_settings(env_file)
    names = [tailing.topic_name(t, settings) for t in topics]
    filters = tailing.Filters(tenant or (), action or (), [str(r) for r in reason or ()])
    status = Console(stderr=True)

    def emit(record: tailing.Tailed) -> None:
        if as_json:
            print(tailing.to_json(record), flush=True)
        else:
            console.print(tailing.line(record), soft_wrap=True)

    def ready(partitions: dict[str, int]) -> None:
        where = ", ".join(f"{topic} ({count} partitions)" for topic, count in partitions.items())
        status.print(f"Following {where} from the {'beginning' if from_beginning else 'end'}; Ctrl-C stops.")

    work = tailing.tail(
        settings, names, emit, filters=filters, limit=limit, from_beginning=from_beginning, on_ready=ready
    )
    try:
        _run_or_exit(work)
    except KeyboardInterrupt:
        status.print("Stopped.")


@app.command("settings")
def show_settings(env_file: EnvFile = None, markdown: bool = typer.Option(False, help="The README table.")) -> None:
    """Show the effective settings (secrets redacted), or every variable as a markdown table."""
    if markdown:
        print(env_table())
        return
    console.print_json(load_settings(env_file).model_dump_json())


@dev.command("up")
def dev_up(run_dir: RunDir = DEFAULT_HOME / "stack", checkpoint: Checkpoint = None) -> None:
    """Start Tansu, SeaweedFS and Triton on free ports, create topics and bucket, write stack.env."""
    from moderation.devkit import localstack
    from moderation.devkit.checkpoints import default_checkpoint

    served: str | Path | None = checkpoint
    if served is None:
        served, trained = default_checkpoint(run_dir.parent)
        console.print(f"Serving the {'trained' if trained else 'RANDOM'} tiny FakeVLM at {served}")
    repository = localstack.model_repository_for(run_dir.parent, served)
    info = localstack.up(run_dir, model_repository=repository, progress=console.log)
    console.print(f"Stack is up. Point a worker or client at it with: --env-file {run_dir / 'stack.env'}")
    for name, value in info.env().items():
        console.print(f"  {name}={value}")


@dev.command("down")
def dev_down(run_dir: RunDir = DEFAULT_HOME / "stack") -> None:
    """Stop exactly the servers `dev up` started."""
    from moderation.devkit import localstack

    stopped = localstack.down(run_dir)
    console.print(f"Stopped: {', '.join(stopped) or 'nothing was running'}")


@dev.command("status")
def dev_status(run_dir: RunDir = DEFAULT_HOME / "stack") -> None:
    """Report each server of the local stack: alive, ready, address, log file."""
    from rich.table import Table

    from moderation.devkit import localstack

    table = Table("server", "pid", "alive", "ready", "address", "log")
    statuses = localstack.status(run_dir)
    for s in statuses:
        table.add_row(s.name, str(s.pid), _yes(s.alive), _yes(s.ready), s.address, str(s.log_file))
    console.print(table)
    if not all(s.ready for s in statuses):
        raise typer.Exit(1)


@dlq.command("inspect")
def dlq_inspect(
    env_file: EnvFile = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Show at most this many (reads at most this many a partition).")
    ] = 100,
    oldest: Annotated[bool, typer.Option("--oldest", help="The oldest first (default: the newest first).")] = False,
) -> None:
    """Show the dead letters, the newest first, with their reasons; records that are not dead letters are
    listed with where they are and why. Reading commits nothing."""
    from rich.markup import escape
    from rich.table import Table

    from moderation.offline.dlq import read_dead_letters

    stored = _run_or_exit(read_dead_letters(load_settings(env_file), limit=limit, newest_first=not oldest))
    table = Table("event_id", "reason", "retryable", "attempts", "source", "dead letter", "last error", "detail")
    malformed = 0
    for s in stored:
        if (d := s.letter) is None:
            malformed += 1
            table.add_row("", "(not a dead letter)", "", "", "", s.where, "", escape(s.problem[:80]))
            continue
        table.add_row(
            str(d.event_id),
            d.reason,
            _yes(d.retryable),
            str(d.attempts),
            f"{d.source_topic}[{d.source_partition}]@{d.source_offset}",
            s.where,
            d.last_error_at.isoformat(timespec="seconds"),
            escape(d.detail[:80]),
        )
    console.print(table)
    console.print(
        f"{len(stored) - malformed} dead letters, {malformed} records that are not, "
        + ("oldest" if oldest else "newest")
        + " first"
    )


@dlq.command(
    "replay",
    help="Re-publish retryable dead letters to the uploads topic, byte for byte, with their attempt count. "
    "Progress is kept per reason code (consumer group <group>-dlq-replay.<reason>) and a replay moves only the "
    "groups of the reasons it replays, so a letter it skips for its reason is still there for a later replay "
    "of that reason; letters at the cap and permanent ones are final. Records that are not dead letters are "
    "reported and skipped. Run one replay at a time.",
)
def dlq_replay(
    env_file: EnvFile = None,
    max_attempts: Annotated[
        int,
        typer.Option(min=1, help="Leave letters whose upload was delivered this often (attempts counts deliveries)."),
    ] = 5,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only these retryable reason codes (repeatable; default: all of them).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would be replayed; publish and commit nothing.")] = False,
) -> None:
    from moderation.errors import RETRYABLE, Reason
    from moderation.offline.dlq import Stored, replay

    if wrong := [r for r in reason or () if r not in RETRYABLE]:
        retryable = ", ".join(sorted(RETRYABLE))
        console.print(f"[red]error:[/] not a retryable reason code: {', '.join(wrong)} (retryable: {retryable})")
        raise typer.Exit(2)
    reasons = {Reason(r) for r in reason} if reason else None

    def show(stored: Stored, verdict: str) -> None:
        if (letter := stored.letter) is None:
            console.print(f"{verdict:>9}  {stored.where}  {stored.problem}", markup=False)
        elif verdict != "earlier":
            console.print(
                f"{verdict:>9}  {stored.where}  {letter.event_id}  {letter.reason}  attempts={letter.attempts}"
            )

    report = _run_or_exit(
        replay(load_settings(env_file), max_attempts=max_attempts, reasons=reasons, dry_run=dry_run, on_letter=show)
    )
    console.print(
        f"replayed {report.replayed}, skipped {report.skipped}, over the cap {report.exhausted}, "
        f"not dead letters {report.malformed}, done by an earlier replay {report.earlier}"
        + (" (dry run: nothing published or committed)" if dry_run else "")
    )


@model.command("build-tiny")
def build_tiny(out_dir: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")]) -> None:
    """Build the tiny FakeVLM-architecture checkpoint used by tests and the demo (no downloads)."""
    from moderation.devkit.tinymodel import build_tiny_checkpoint

    console.print(f"Tiny checkpoint ready at {build_tiny_checkpoint(out_dir)}")


@model.command("train-tiny")
def train_tiny(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Where to save it (default: the repository's models/fakevlm-tiny-trained)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the initial weights and the training images.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps (default: the committed model's).")] = None,
) -> None:
    """Train the tiny FakeVLM on synthetic images with known answers (CPU, minutes, deterministic)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from moderation.devkit.training import (
        DEFAULT_STEPS,
        TRAINED_CHECKPOINT,
        TrainProgress,
        read_metrics,
        train_tiny_fakevlm,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[loss]}"), console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def show(p: TrainProgress) -> None:
            if p.phase not in tasks:
                tasks[p.phase] = bar.add_task(p.phase, total=p.total, loss="")
            loss = f"loss {p.loss:.4f}  verdict {p.verdict_loss:.4f}" if p.loss is not None else ""
            bar.update(tasks[p.phase], completed=p.done, loss=loss)
            if not console.is_terminal and (p.done % 25 == 0 or p.done == p.total):
                console.print(f"{p.phase} {p.done}/{p.total} {loss}")  # a log file gets no live bar

        path = train_tiny_fakevlm(out_dir or TRAINED_CHECKPOINT, seed=seed, steps=steps or DEFAULT_STEPS, progress=show)
    console.print_json(json.dumps(read_metrics(path)))
    console.print(f"Trained tiny FakeVLM saved to {path}")


@model.command("check")
def check_model(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders: a few dozen, real and fake.")],
    checkpoint: Checkpoint = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Free answer length (FakeVLM's eval.py: 256).")] = 256,
    out: Annotated[Path | None, typer.Option(help="Write the report, every answer included, as JSON.")] = None,
) -> None:
    """Is verdict-first valid for this checkpoint? Free greedy answers (as FakeVLM's eval.py) vs the forced verdict."""
    from moderation.model.fakevlm import ANSWER_PREFIX, FakeVLM
    from moderation.offline.modelcheck import check, load_images

    source = _required_model(checkpoint)
    pixels, used, skipped = load_images(images)
    for reason in skipped:
        _warn(f"skipped {reason}")
    if not used:
        raise typer.BadParameter("no readable image among IMAGES")
    vlm = _run_or_exit(asyncio.to_thread(FakeVLM.load, source, device=device, dtype=dtype.value if dtype else None))
    report = check(vlm, pixels, max_new_tokens=max_new_tokens)
    if out is not None:
        out.write_text(report.to_json() + "\n")
    agreement = "n/a" if report.agreement is None else f"{report.agreement:.1%}"
    console.print(f"{vlm.model_id}: {report.images} images")
    console.print(f"  free answers starting with {ANSWER_PREFIX!r}: {report.prefix_share:.1%}")
    console.print(f"  verdict-first label = free answer's label (eval rule): {agreement} of {report.labelled}")
    if report.disagreements:
        console.print(
            f"  {report.disagreements} disagree; |P(fake) - 0.5| there: mean {report.margin_mean:.3f}, "
            f"max {report.margin_max:.3f}"
        )
    valid = report.prefix_share >= 0.95 and (report.agreement or 0.0) >= 0.95
    console.print(f"  verdict-first valid for this checkpoint: {_yes(valid)}")


def _yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"


@review.command("serve")
def review_serve(
    env_file: EnvFile = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (behind the signing-in proxy).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8090,
) -> None:
    """Serve the review console: the queue awaiting review, its images, and decisions with the keyboard."""
    import uvicorn

    from moderation.logs import logging_config
    from moderation.review.app import create_app

    settings = load_settings(env_file)
    try:
        console_app = create_app(settings)
    except ValueError as exc:  # e.g. malformed MODERATION_REVIEW_TOKENS
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from exc
    console.print(f"Review console on http://{host}:{port}/ (queue: {settings.topic_review})")
    uvicorn.run(console_app, host=host, port=port, log_config=logging_config(settings.log_level), proxy_headers=True)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app()


policy_app = typer.Typer(help="Per-tenant policy files: check one, print their JSON Schema.", no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("schema")
def policy_schema(write: Annotated[Path | None, typer.Option(help="Write the schema to this file.")] = None) -> None:
    """Print (or write) the JSON Schema of a policy file (schemas/policy.schema.json)."""
    from moderation.policy import policy_schema

    text = json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"
    if write is None:
        print(text, end="")
        return
    write.write_text(text)
    console.print(f"Wrote {write}")


@policy_app.command("check")
def policy_check(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The policy YAML.")],
    env_file: EnvFile = None,
) -> None:
    """Validate a policy file as the worker would, over these settings, and show every tenant's rules."""
    from rich.markup import escape
    from rich.table import Table

    from moderation.policy import InvalidPolicy
    from moderation.worker.policies import Policies

    try:
        policies = Policies.from_file(file, load_settings(env_file))
    except InvalidPolicy as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    table = Table("tenant", "review", "flag", "explain above", "declared AI", "match")
    for name, p in [("(default)", policies.default), *sorted(policies.tenants.items())]:
        provenance = p.provenance.declared_ai + (", skip model" if p.provenance.skip_model else "")
        m = p.match
        match = "off" if not m.enabled else f"d<={m.max_distance} q>={m.min_quality} {m.apply}"
        match += (", skip model" if m.skip_model and m.enabled else "") + (", bank flags" if m.bank_model_flags else "")
        table.add_row(
            name, f"{p.review_threshold:g}", f"{p.flag_threshold:g}", f"{p.explain_above:g}", provenance, match
        )
    console.print(table)
    console.print(f"policy {policies.version}: valid, {len(policies.tenants)} tenants")


bank_app = typer.Typer(
    help="The near-duplicate bank: PDQ hash lists in and out (ThreatExchange signal files, CSV).", no_args_is_help=True
)
app.add_typer(bank_app, name="bank")
ListFormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="threatexchange (`pdq <hash>` a line, as python-threatexchange's file exchange) or csv "
        "(hash,label,source); default: csv for a .csv file, else threatexchange.",
    ),
]


def _list_format(given: str | None, path: Path | None) -> ListFormat:
    from moderation.worker.hashlists import ListFormat

    if given is None:
        return ListFormat.CSV if path is not None and path.suffix.lower() == ".csv" else ListFormat.THREATEXCHANGE
    try:
        return ListFormat(given)
    except ValueError:
        console.print(f"[red]error:[/] unknown format {given!r} (threatexchange or csv)")
        raise typer.Exit(2) from None


@bank_app.command("import")
def bank_import(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The hash list.")],
    source: Annotated[str | None, typer.Option(help="Where the list came from (default: the file's name).")] = None,
    list_format: ListFormatOption = None,
    label: Annotated[
        str, typer.Option(help="The label of a ThreatExchange file's hashes (it lists only positives).")
    ] = ("fake"),
    env_file: EnvFile = None,
) -> None:
    """Publish a list's PDQ hashes to the bank topic, each carrying its source: every worker matches uploads
    against them, below any reviewer's decision. Nothing is published if any line is not a PDQ hash."""
    from moderation.events import utcnow
    from moderation.worker.hashlists import InvalidList, bank_entry, publish_entries, read_list

    if label not in ("fake", "real"):
        console.print(f"[red]error:[/] label {label!r} is neither fake nor real")
        raise typer.Exit(2)
    name = source or file.name
    try:
        parsed = read_list(file.read_text(), _list_format(list_format, file), source=name, label=label)  # type: ignore[arg-type]
    except (InvalidList, UnicodeDecodeError) as exc:
        console.print(f"[red]error:[/] {escape(str(exc))}", highlight=False)
        raise typer.Exit(1) from exc
    now = utcnow()
    _run_or_exit(publish_entries(load_settings(env_file), [bank_entry(h, now) for h in parsed.hashes]))
    skipped = f" ({parsed.other_signals} lines of other signal types skipped)" if parsed.other_signals else ""
    console.print(f"imported {len(parsed.hashes)} PDQ hashes from {escape(name)}{skipped}", highlight=False)


@bank_app.command("export")
def bank_export(
    out: Annotated[Path | None, typer.Option(help="Write here (default: standard output).")] = None,
    list_format: ListFormatOption = None,
    decided_by: Annotated[list[str] | None, typer.Option(help="Whose decisions (repeatable; default: review).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Which labels (repeatable; default: fake).")] = None,
    source: Annotated[str, typer.Option(help="The source column of this platform's own hashes (csv).")] = "moderation",
    env_file: EnvFile = None,
) -> None:
    """Write the bank's hashes (by default the reviewers' confirmed fakes) as a list another platform imports."""
    from moderation.worker.hashlists import exported, read_bank, write_list

    bank = _run_or_exit(read_bank(load_settings(env_file)))
    hashes = exported(bank, decided_by=set(decided_by or ["review"]), labels=set(label or ["fake"]), source=source)
    text = write_list(hashes, _list_format(list_format, out))
    if out is None:
        print(text, end="")
        return
    out.write_text(text)
    console.print(f"wrote {len(hashes)} PDQ hashes to {out}", highlight=False)


@bank_app.command("remove")
def bank_remove(
    source: Annotated[str, typer.Option(help="The source the hashes were imported from.")],
    env_file: EnvFile = None,
) -> None:
    """Remove every hash imported from a source (tombstones on the bank topic: every worker forgets them)."""
    from moderation.worker.hashlists import remove_source

    removed = _run_or_exit(remove_source(load_settings(env_file), source))
    console.print(f"removed {removed} PDQ hashes imported from {escape(source)}", highlight=False)
