"""`moderation review`: the review console for trust-and-safety reviewers."""

from __future__ import annotations

from typing import Annotated

import typer

from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console

app = typer.Typer(name="review", help="The review console for trust-and-safety reviewers.", no_args_is_help=True)


@app.command("serve")
def serve(
    env_file: EnvFile = None,
    host: Annotated[str, typer.Option(help="Interface to listen on (behind the signing-in proxy).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8090,
) -> None:
    """Serve the review console: the queue awaiting review, its images, and decisions with the keyboard."""
    import uvicorn

    from moderation.logs import logging_config
    from moderation.review.app import create_app

    settings = load_settings(env_file)
    console_app = create_app(settings)
    console.print(f"Review console on http://{host}:{port}/ (queue: {settings.topic_review})")
    uvicorn.run(console_app, host=host, port=port, log_config=logging_config(settings.log_level), proxy_headers=True)
