"""The AsyncAPI document: committed as generated, valid by the official parser, and true to what the code writes."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from moderation.adapters.deadletters import ATTEMPTS_HEADER, DLQ_HEADER_PREFIX, dead_letter_headers
from moderation.asyncapi import CHANNELS, DEAD_LETTER_HEADERS, default_settings, document
from moderation.cli.main import app
from moderation.errors import Reason
from moderation.events import CacheEntry, DeadLetter, ImageInfo, ModelInfo, Timings, Verdict, utcnow
from moderation.settings import Settings
from moderation.worker.cache import cache_key

ROOT = Path(__file__).parent.parent
COMMITTED = ROOT / "schemas" / "asyncapi.yaml"
# Where .ci/run installs the official parser (`npm install --prefix .moderation/node @asyncapi/parser@3`).
NODE_MODULES = ROOT / ".moderation" / "node" / "node_modules"

# Parses each document with @asyncapi/parser, prints every diagnostic as a JSON line, exits 1 on any error.
PARSE_JS = """
const path = require("path");
const { Parser, fromFile } = require(path.join(process.argv[2], "@asyncapi/parser"));
(async () => {
  let failed = false;
  for (const file of process.argv.slice(3)) {
    const { document, diagnostics } = await fromFile(new Parser(), file).parse();
    for (const d of diagnostics) {
      const { severity, code, message } = d;
      console.log(JSON.stringify({ file, severity, code, message, path: d.path.join(".") }));
    }
    failed ||= document === undefined || diagnostics.some((d) => d.severity === 0);
  }
  process.exit(failed ? 1 : 0);
})().catch((e) => { console.error(e); process.exit(2); });
"""
SPECTRAL_ERROR = 0

NOW = utcnow()
MODEL = ModelInfo(name="fakevlm", version="1 (lingcco/fakeVLM)", weights="hf:lingcco/fakeVLM@" + "0" * 40)
IMAGE = ImageInfo(width=64, height=48, format="PNG")


def test_the_committed_document_is_the_generated_one() -> None:
    committed = yaml.safe_load(COMMITTED.read_text())
    assert committed == document(), (
        "schemas/asyncapi.yaml drifted: run `moderation asyncapi --write schemas/asyncapi.yaml`"
    )


def test_the_command_prints_yaml_and_json_of_the_same_document() -> None:
    runner = CliRunner()
    as_yaml = runner.invoke(app, ["asyncapi"])
    as_json = runner.invoke(app, ["asyncapi", "--json"])
    assert as_yaml.exit_code == 0 and as_json.exit_code == 0, as_yaml.output + as_json.output
    assert yaml.safe_load(as_yaml.stdout) == json.loads(as_json.stdout) == document()


def test_an_env_file_renders_a_deployments_topics(tmp_path: Path) -> None:
    env = tmp_path / "prod.env"
    env.write_text("MODERATION_TOPIC_VERDICTS=prod.verdicts\nMODERATION_KAFKA_TOPIC_PARTITIONS=12\n")
    result = CliRunner().invoke(app, ["asyncapi", "--json", "--env-file", str(env)])
    assert result.exit_code == 0, result.output
    verdicts = json.loads(result.stdout)["channels"]["verdicts"]
    assert verdicts["address"] == verdicts["bindings"]["kafka"]["topic"] == "prod.verdicts"
    assert verdicts["bindings"]["kafka"]["partitions"] == 12


def test_every_topic_setting_has_its_channel() -> None:
    """A topic added to the settings (issue 14's review and decisions) must be described: one Channel entry."""
    topics = {name for name in Settings.model_fields if name.startswith("topic_")}
    assert {channel.setting for channel in CHANNELS} == topics
    addresses = [c["address"] for c in document()["channels"].values()]
    assert sorted(addresses) == sorted(str(getattr(default_settings(), t)) for t in topics)


def test_retention_and_compaction_agree_with_the_topic_job() -> None:
    """deploy/base/topics creates the topics with these settings; the document must say the same."""
    env = dict(
        line.split("=", 1) for line in (ROOT / "deploy/base/topics/topics.env").read_text().split() if "=" in line
    )
    script = (ROOT / "deploy/base/topics/create-topics.sh").read_text()
    for channel in CHANNELS:
        config = document()["channels"][channel.name]["bindings"]["kafka"]["topicConfiguration"]
        variable = f"{channel.setting.upper()}_RETENTION_MS"
        if channel.retention_ms is None:
            assert config["cleanup.policy"] == ["compact"]
            assert re.search(rf'"\$MODERATION_{channel.setting.upper()}" --config "cleanup.policy=compact"', script)
        else:
            assert config["retention.ms"] == int(env[variable]), variable


def test_the_workers_dead_letter_headers_match_their_schema() -> None:
    letter = DeadLetter(
        event_id="evt-1",
        reason=Reason.STORAGE_UNAVAILABLE,
        detail="S3 down",
        retryable=True,
        attempts=2,
        first_error_at=NOW,
        last_error_at=NOW,
        source_topic="moderation.uploads",
        source_partition=3,
        source_offset=41,
        payload_base64="",
    )
    original = [
        ("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        (ATTEMPTS_HEADER, b"1"),
        (DLQ_HEADER_PREFIX + "reason", b"old"),
    ]
    headers = {name: value.decode() for name, value in dead_letter_headers(letter, original) if value is not None}
    jsonschema.validate(headers, DEAD_LETTER_HEADERS)
    assert headers[DLQ_HEADER_PREFIX + "reason"] == "storage_unavailable"
    documented = {n for n in DEAD_LETTER_HEADERS["properties"] if n.startswith(DLQ_HEADER_PREFIX)}
    assert documented == {n for n in headers if n.startswith(DLQ_HEADER_PREFIX)}


def _validator(ref: str) -> jsonschema.protocols.Validator:
    """A validator for `#/components/...` inside the document itself, as a consumer resolves it."""
    doc = document()
    schema = {"$ref": ref, "components": doc["components"]}
    return jsonschema.Draft7Validator(schema)


def _key_schema(message: str) -> dict[str, Any]:
    return dict(document()["components"]["messages"][message]["bindings"]["kafka"]["key"])


def test_real_messages_and_keys_validate_against_the_document() -> None:
    verdict = Verdict(
        event_id="evt-1",
        bucket="uploads",
        key="a.png",
        tenant="acme",
        image_sha256="a" * 64,
        label="fake",
        score=0.93,
        action="flag",
        explanation="This is a fake image.",
        model=MODEL,
        image=IMAGE,
        timings=Timings(fetch_ms=1, decode_ms=2, inference_ms=3, total_ms=6),
        decided_at=NOW,
    )
    entry = CacheEntry.of(verdict)
    _validator("#/components/schemas/Verdict").validate(json.loads(verdict.to_bytes()))
    _validator("#/components/schemas/CacheEntry").validate(json.loads(entry.to_bytes()))
    with pytest.raises(jsonschema.ValidationError):
        _validator("#/components/schemas/Verdict").validate(json.loads(verdict.to_bytes()) | {"score": 2})
    jsonschema.validate(verdict.event_id, _key_schema("verdict"))
    jsonschema.validate(cache_key(entry.image_sha256, entry.model), _key_schema("cacheEntry"))


def test_the_official_parser_accepts_the_document(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the AsyncAPI parser (npm @asyncapi/parser) cannot run")
    if not (NODE_MODULES / "@asyncapi" / "parser").is_dir():
        pytest.skip(f"@asyncapi/parser is not installed: npm install --prefix {NODE_MODULES.parent} @asyncapi/parser@3")
    script = tmp_path / "parse.cjs"
    script.write_text(PARSE_JS)
    deployment = Settings.model_validate(
        {"kafka_security_protocol": "SASL_SSL", "topic_dlq": "prod.dlq", "kafka_replication_factor": 3}
    )
    rendered = tmp_path / "deployment.json"
    rendered.write_text(json.dumps(document(deployment)))
    run = subprocess.run(
        [node, str(script), str(NODE_MODULES), str(COMMITTED), str(rendered)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    diagnostics = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    errors = [d for d in diagnostics if d["severity"] == SPECTRAL_ERROR]
    assert run.returncode == 0 and not errors, run.stdout + run.stderr
