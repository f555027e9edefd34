"""`moderation schema`, `moderation asyncapi` and `moderation settings`: the contracts, as documents."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console
from moderation.events import json_schemas
from moderation.settings import env_table

app = typer.Typer()


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


@app.command("settings")
def settings(
    env_file: EnvFile = None, markdown: Annotated[bool, typer.Option(help="The README table.")] = False
) -> None:
    """Show the effective settings (secrets redacted), or every variable as a markdown table."""
    if markdown:
        print(env_table())
        return
    console.print_json(load_settings(env_file).model_dump_json())
