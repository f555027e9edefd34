"""Per-tenant policy (moderation/policy.py): inheritance, the default for unknown tenants, clear
validation errors, the reload task, the schema and the example file."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.policy import InvalidPolicy, MatchRule, Policy, ProvenanceRule, parse_policy, policy_schema
from moderation.settings import Settings
from moderation.worker import metrics
from moderation.worker.policies import Policies

ROOT = Path(__file__).parents[2]
EXAMPLE = ROOT / "deploy" / "policy" / "example-policy.yaml"
SCHEMA = ROOT / "schemas" / "policy.schema.json"
SETTINGS = Settings(review_threshold=0.4, flag_threshold=0.9, explain_above=0.7)

POLICY = """
version: v1
default:
  flag_threshold: 0.85
  match: {max_distance: 20, min_quality: 70}
tenants:
  acme:
    review_threshold: 0.3
    provenance: {declared_ai: evidence_only}
    match: {apply: evidence_only}
  strict:
    review_threshold: 0.1
    flag_threshold: 0.2
    explain_above: 0
    match: {enabled: false, bank_model_flags: true}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def failures() -> float:
    return metrics.REGISTRY.get_sample_value("moderation_policy_reload_failures_total") or 0.0


def refused() -> float | None:
    return metrics.REGISTRY.get_sample_value("moderation_policy_file_refused")


def info(version: str) -> float | None:
    return metrics.REGISTRY.get_sample_value("moderation_policy_info", {"version": version})


def test_the_policy_without_a_file_is_the_settings_for_every_tenant() -> None:
    policies = Policies.from_settings(SETTINGS)
    expected = Policy(0.4, 0.9, 0.7, "settings", ProvenanceRule(), MatchRule())
    assert policies.version == "settings"
    assert policies.for_tenant(None) == policies.for_tenant("anyone") == expected
    assert expected.action(0.39) == "allow" and expected.action(0.4) == "review" and expected.action(0.9) == "flag"
    assert info("settings") == 1


def test_tenants_inherit_field_by_field_from_the_default_and_the_default_from_the_settings(tmp_path: Path) -> None:
    policies = Policies.from_file(write(tmp_path / "p.yaml", POLICY), SETTINGS)
    default = Policy(0.4, 0.85, 0.7, "v1", ProvenanceRule(), MatchRule(max_distance=20, min_quality=70))
    assert policies.default == default
    assert policies.for_tenant("acme") == Policy(
        0.3,
        0.85,
        0.7,
        "v1",
        ProvenanceRule(declared_ai="evidence_only"),
        MatchRule(max_distance=20, min_quality=70, apply="evidence_only"),
    )
    strict = policies.for_tenant("strict")
    assert (strict.review_threshold, strict.flag_threshold, strict.explain_above) == (0.1, 0.2, 0.0)
    assert strict.match == MatchRule(enabled=False, max_distance=20, min_quality=70, bank_model_flags=True)
    assert strict.provenance == ProvenanceRule()
    assert strict.action(0.15) == "review" and strict.action(0.2) == "flag"


def test_an_unknown_or_missing_tenant_gets_the_default(tmp_path: Path) -> None:
    policies = Policies.from_file(write(tmp_path / "p.yaml", POLICY), SETTINGS)
    assert policies.for_tenant("nobody") is policies.default
    assert policies.for_tenant(None) is policies.default
    assert policies.for_tenant("ACME") is policies.default  # tenant names are exact
    assert {p.version for p in (policies.default, *policies.tenants.values())} == {"v1"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("default: {}\n", "version: required"),
        ("version: 2026-05-01\n", "version: Input should be a valid string (quote it)"),
        ("version: two words\n", "version: String should match pattern"),
        ("version: v1\ndefault: {flag_treshold: 0.5}\n", "default.flag_treshold: unknown field"),
        ("version: v1\ndefault: {review_threshold: 1.5}\n", "default.review_threshold: Input should be less than"),
        ("version: v1\ndefault: {review_threshold: -0.1}\n", "default.review_threshold: Input should be greater than"),
        (
            "version: v1\ndefault: {review_threshold: 0.9, flag_threshold: 0.5}\n",
            "default: review_threshold (0.9) must not exceed flag_threshold (0.5)",
        ),
        (
            "version: v1\ntenants: {acme: {review_threshold: 0.95}}\n",
            "tenants.acme: review_threshold (0.95) must not exceed flag_threshold (0.9) (after inheritance)",
        ),
        ("version: v1\ndefault: {match: {max_distance: 257}}\n", "default.match.max_distance: Input should be less"),
        ("version: v1\ndefault: {match: {min_quality: -1}}\n", "default.match.min_quality: Input should be greater"),
        (
            "version: v1\ntenants: {a: {match: {apply: always}}}\n",
            "tenants.a.match.apply: Input should be 'banked_label'",
        ),
        (
            "version: v1\ntenants: {a: {provenance: {declared_ai: real}}}\n",
            "tenants.a.provenance.declared_ai: Input should be 'label_fake' or 'evidence_only'",
        ),
        ("version: v1\ntenants: {'': {}}\n", 'tenants."" (the name): String should have at least 1 character'),
        ("version: v1\ntenants:\n  a: {}\n  a: {}\n", "duplicate key 'a'"),
        ("version: v1\ndefault: [1\n", "not valid YAML"),
        ("- version: v1\n", "must be a mapping"),
        ("", "must be a mapping"),
    ],
)
def test_invalid_files_are_refused_with_where_and_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(InvalidPolicy) as caught:
        Policies.from_file(write(tmp_path / "p.yaml", text), SETTINGS)
    assert message in str(caught.value)
    assert str(tmp_path / "p.yaml") in str(caught.value)


def test_a_missing_file_is_refused() -> None:
    with pytest.raises(InvalidPolicy, match="cannot read the policy file"):
        Policies.from_file(Path("/nonexistent/policy.yaml"), SETTINGS)


def test_every_problem_of_a_file_is_named_at_once() -> None:
    with pytest.raises(InvalidPolicy) as caught:
        parse_policy("version: v1\ndefault: {review_threshold: 2, colour: red, match: {max_distance: 999}}\n")
    assert str(caught.value).count(";") == 2


def test_a_reload_swaps_a_valid_edit_and_keeps_the_policy_on_a_bad_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path / "p.yaml", POLICY)
    policies = Policies.from_file(path, SETTINGS)
    assert not policies.reload()  # unchanged content

    write(path, POLICY.replace("version: v1", "version: v2").replace("review_threshold: 0.3", "review_threshold: 0.6"))
    assert policies.reload()
    assert policies.version == "v2" and policies.for_tenant("acme").review_threshold == 0.6
    assert info("v2") == 1 and info("v1") is None

    before = failures()
    with caplog.at_level(logging.ERROR, logger="moderation.policy"):
        write(path, POLICY.replace("version: v1", "version: v3").replace("0.3", "0.95"))
        assert not policies.reload()
        assert not policies.reload()  # the same bad content: logged and counted once
    assert failures() == before + 1 and refused() == 1
    assert policies.version == "v2" and policies.for_tenant("acme").review_threshold == 0.6
    assert [r.getMessage() for r in caplog.records] == [
        f"policy file {path}: tenants.acme: review_threshold (0.95) must not exceed flag_threshold (0.85) "
        "(after inheritance); policy v2 stays in force"
    ]

    path.unlink()
    assert not policies.reload()
    assert failures() == before + 2 and policies.version == "v2"

    write(path, POLICY.replace("version: v1", "version: v2").replace("review_threshold: 0.3", "review_threshold: 0.6"))
    assert not policies.reload()  # back to the content in force: nothing to swap, nothing refused
    assert refused() == 0 and failures() == before + 2


async def test_the_watch_task_picks_up_edits_while_it_runs(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", POLICY)
    policies = Policies.from_file(path, SETTINGS)
    task = asyncio.create_task(policies.watch(0.05))
    try:
        write(path, POLICY.replace("version: v1", "version: v2"))
        await wait_for(lambda: policies.version == "v2")
        before = failures()
        write(path, "version: v3\ndefault: {flag_threshold: 7}\n")
        await wait_for(lambda: failures() == before + 1)
        assert policies.version == "v2"
        write(path, "version: v4\n")
        await wait_for(lambda: policies.version == "v4")
        assert policies.for_tenant("acme") == Policy(0.4, 0.9, 0.7, "v4")
        assert failures() == before + 1 and refused() == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()


async def wait_for(condition: object, limit_s: float = 20.0) -> None:
    """Poll until `condition()` holds; the limit only stops a broken test from hanging (never a timing check)."""
    async with asyncio.timeout(limit_s):
        while not condition():  # type: ignore[operator]
            await asyncio.sleep(0.02)


async def test_watch_without_a_file_returns_at_once() -> None:
    await asyncio.wait_for(Policies.from_settings(SETTINGS).watch(0.01), 5)


def test_the_settings_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_POLICY_FILE", str(write(tmp_path / "p.yaml", POLICY)))
    monkeypatch.setenv("MODERATION_POLICY_RELOAD_S", "2.5")
    settings = Settings()
    assert settings.policy_reload_s == 2.5
    assert Policies.load(settings).version == "v1"
    assert Policies.load(Settings(policy_file=None)).version == "settings"


def test_committed_schema_matches_the_model() -> None:
    assert json.loads(SCHEMA.read_text()) == policy_schema(), "run `moderation policy schema --write " + str(
        SCHEMA.relative_to(ROOT)
    )


def test_the_example_file_is_valid_and_uses_every_rule() -> None:
    raw = yaml.safe_load(EXAMPLE.read_text())
    jsonschema.validate(raw, policy_schema())
    policies = Policies.from_file(EXAMPLE, Settings())
    assert policies.tenants and policies.version == raw["version"]
    assert set(raw["default"]) == {"review_threshold", "flag_threshold", "explain_above", "provenance", "match"}
    assert set(raw["default"]["match"]) == set(MatchRule.__dataclass_fields__)
    assert set(raw["default"]["provenance"]) == set(ProvenanceRule.__dataclass_fields__)


def test_the_schema_refuses_what_the_model_refuses() -> None:
    for bad in ({"default": {}}, {"version": "v1", "default": {"review_threshold": 2}}, {"version": "v1", "x": 1}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, policy_schema())


def test_cli_check_and_schema(tmp_path: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(app, ["policy", "check", str(EXAMPLE)])
    assert ok.exit_code == 0, ok.output
    assert "valid, 3 tenants" in ok.output and "newsroom" in ok.output
    bad = runner.invoke(app, ["policy", "check", str(write(tmp_path / "bad.yaml", "version: v1\nx: 1\n"))])
    assert bad.exit_code == 2 and "x: unknown field" in bad.output
    printed = runner.invoke(app, ["policy", "schema"])
    assert printed.exit_code == 0 and json.loads(printed.output) == json.loads(SCHEMA.read_text())
