"""The `moderation` command's shape and its one error handler, over every command the app registers: a bad
`MODERATION_*` value is one line naming the variable and exit status 2, never a traceback; a `ModerationError`
is one line and 2; anything else is a crash (1). And the README's command reference lists what the code has."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer.main
from typer.core import TyperCommand, TyperGroup
from typer.testing import CliRunner, Result

from moderation.cli import contracts, main
from moderation.cli.main import app
from moderation.errors import ModerationError

ROOT = Path(__file__).resolve().parents[2]
BAD = {"MODERATION_KAFKA_FETCH_MAX_WAIT_MS": "abc"}  # an int setting that every command's settings hold


def commands() -> Iterator[tuple[tuple[str, ...], TyperCommand]]:
    def walk(group: TyperGroup, path: tuple[str, ...]) -> Iterator[tuple[tuple[str, ...], TyperCommand]]:
        for name, command in group.commands.items():
            if isinstance(command, TyperGroup):
                yield from walk(command, (*path, name))
            else:
                assert isinstance(command, TyperCommand)
                yield (*path, name), command

    root = typer.main.get_command(app)
    assert isinstance(root, TyperGroup)
    return walk(root, ())


COMMANDS = dict(commands())
WITH_ENV_FILE = [path for path, command in COMMANDS.items() if any(p.name == "env_file" for p in command.params)]


def one_red_line(result: Result, *said: str) -> None:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and result.exception is not None
    assert isinstance(result.exception, SystemExit), result.exception
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ") and all(s in line for s in said), line


def test_the_commands_are_found() -> None:
    assert len(COMMANDS) >= 20 and ("worker",) in COMMANDS and ("dlq", "replay") in COMMANDS
    assert ("precision",) in COMMANDS and len(WITH_ENV_FILE) >= 12


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_a_bad_variable_stops_every_command_in_one_line(path: tuple[str, ...]) -> None:
    one_red_line(CliRunner().invoke(app, list(path), env=BAD), "MODERATION_KAFKA_FETCH_MAX_WAIT_MS", "integer")


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_help_needs_no_settings(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env=BAD)
    assert result.exit_code == 0 and "Usage" in result.output, result.output


@pytest.mark.parametrize("path", WITH_ENV_FILE, ids=" ".join)
def test_a_bad_value_in_the_env_file_stops_every_command_in_one_line(
    path: tuple[str, ...], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command reads its --env-file before any work; what it is given for its required parameters is
    `topic`, which names a file here, a topic, a source and the decisions topic alike."""
    for name in BAD:
        monkeypatch.delenv(name, raising=False)  # the environment's value would win over the file's
    monkeypatch.chdir(tmp_path)
    (tmp_path / "topic").write_text("pdq 0000\n")
    env_file = tmp_path / "bad.env"
    env_file.write_text("".join(f"{name}={value}\n" for name, value in BAD.items()))
    required = [p for p in COMMANDS[path].params if p.required]
    given = [arg for p in required for arg in (["topic"] if p.param_type_name == "argument" else [p.opts[0], "topic"])]
    result = CliRunner().invoke(app, [*path, *given, "--env-file", str(env_file)])
    one_red_line(result, "MODERATION_KAFKA_FETCH_MAX_WAIT_MS")


def test_settings_that_disagree_name_their_variables() -> None:
    env = {"MODERATION_REVIEW_THRESHOLD": "0.9", "MODERATION_FLAG_THRESHOLD": "0.5"}
    result = CliRunner().invoke(app, ["settings"], env=env)
    one_red_line(result, "MODERATION_REVIEW_THRESHOLD must not exceed MODERATION_FLAG_THRESHOLD")


def test_a_secret_value_is_never_shown() -> None:
    result = CliRunner().invoke(app, ["settings"], env={"MODERATION_KAFKA_SASL_MECHANISM": "hunter2-secret"})
    one_red_line(result, "MODERATION_KAFKA_SASL_MECHANISM")
    assert "hunter2" not in result.output


def test_a_moderation_error_is_one_line_and_a_bug_is_a_crash(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise ModerationError("[model] cannot be loaded")  # brackets: no rich markup

    monkeypatch.setattr(contracts, "json_schemas", refuse)
    one_red_line(CliRunner().invoke(app, ["schema"]), "error: [model] cannot be loaded")

    def crash() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(contracts, "json_schemas", crash)
    result = CliRunner().invoke(app, ["schema"])
    assert result.exit_code == 1 and isinstance(result.exception, RuntimeError)


def test_every_command_module_is_registered_and_independent_of_the_others() -> None:
    shared = {"__init__", "main", "options", "output"}
    modules = {p.stem for p in (ROOT / "moderation" / "cli").glob("*.py")} - shared
    assert {m.__name__.rsplit(".", 1)[1] for m in main.COMMAND_MODULES} == modules
    contracts_ = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    [independent] = [c for c in contracts_ if c["type"] == "independence" and "moderation.cli.worker" in c["modules"]]
    assert set(independent["modules"]) == {f"moderation.cli.{m}" for m in modules}


def test_the_readme_command_reference_is_the_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Commands\n", 1)[1].split("\n## ", 1)[0]
    table = [line.split(" | ")[0] for line in section.splitlines() if line.startswith("| `moderation ")]
    named = [words.split() for cell in table for words in re.findall(r"`moderation ([^`]*)`", cell)]
    documented = set()
    for words in named:
        path = next((p for p in COMMANDS if tuple(words[: len(p)]) == p), None)
        assert path is not None, f"README's Commands names `moderation {' '.join(words)}`, which is no command"
        documented.add(path)
    missing = sorted(" ".join(p) for p in set(COMMANDS) - documented)
    assert not missing, f"README's Commands lacks: {missing}"
