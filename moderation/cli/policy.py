"""`moderation policy`: per-tenant policy files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.table import Table

from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console

if TYPE_CHECKING:
    from moderation.policy import Policy
    from moderation.worker.policies import Policies

app = typer.Typer(
    name="policy", help="Per-tenant policy files: check one, print their JSON Schema.", no_args_is_help=True
)


@app.command("schema")
def schema(write: Annotated[Path | None, typer.Option(help="Write the schema to this file.")] = None) -> None:
    """Print (or write) the JSON Schema of a policy file (schemas/policy.schema.json)."""
    from moderation.policy import policy_schema

    text = json.dumps(policy_schema(), indent=2, sort_keys=True) + "\n"
    if write is None:
        print(text, end="")
        return
    write.write_text(text)
    console.print(f"Wrote {write}")


@app.command("check")
def check(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The policy YAML.")],
    env_file: EnvFile = None,
) -> None:
    """Validate a policy file as the worker would, over these settings, and show every tenant's rules."""
    from moderation.worker.policies import Policies

    policies = Policies.from_file(file, load_settings(env_file))
    console.print(_rules_table(policies))
    console.print(f"policy {policies.version}: valid, {len(policies.tenants)} tenants")


def _rules_table(policies: Policies) -> Table:
    table = Table("tenant", "review", "flag", "explain above", "declared AI", "match")
    for name, p in [("(default)", policies.default), *sorted(policies.tenants.items())]:
        table.add_row(
            name,
            f"{p.review_threshold:g}",
            f"{p.flag_threshold:g}",
            f"{p.explain_above:g}",
            p.provenance.declared_ai + (", skip model" if p.provenance.skip_model else ""),
            _match(p),
        )
    return table


def _match(p: Policy) -> str:
    m = p.match
    said = f"d<={m.max_distance} q>={m.min_quality} {m.apply}" + (", skip model" if m.skip_model else "")
    return ("off" if not m.enabled else said) + (", bank flags" if m.bank_model_flags else "")
