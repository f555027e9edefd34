"""`moderation publish` and `moderation tail`: uploads onto the stream as a platform backend sends them, and any
topic read back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console, status
from moderation.errors import Reason

app = typer.Typer()


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

    settings = load_settings(env_file)
    names = [tailing.topic_name(t, settings) for t in topics]
    filters = tailing.Filters(tenant or (), action or (), [str(r) for r in reason or ()])

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
    chatter = logging.getLogger("aiokafka")  # its assignment lines are not the records
    level = chatter.level
    chatter.setLevel(logging.WARNING)
    try:
        asyncio.run(work)
    except KeyboardInterrupt:
        status.print("Stopped.")
    finally:
        chatter.setLevel(level)  # for whoever runs commands in this process next (the tests do)
