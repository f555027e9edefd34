"""The topics: the topic Job (its very script, against a stub kafka-topics.sh) and Strimzi create every topic with
the worker's partitions and replication, and the ACLs let only the worker and the explainer write the cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from moderation.settings import Settings
from moderation.worker.explainer import explainer_group
from tests.deploy.manifests import (
    DEPLOY,
    OVERLAYS,
    WORKER,
    container,
    explainer_env,
    find,
    rel,
    render,
    settings_of,
    worker_env,
)

TOPICS = (
    "UPLOADS",
    "VERDICTS",
    "FLAGGED",
    "DLQ",
    "REVIEW",
    "DECISIONS",
    "CACHE",
    "BANK",
    "EXPLAIN_REQUESTS",
    "EXPLANATIONS",
)  # MODERATION_TOPIC_*, in Job order
STUB = """#!/bin/sh
echo "$*" >> "$STUB_LOG"
case "$*" in *--describe*) echo "Topic: x	PartitionCount: $STUB_PARTITIONS	ReplicationFactor: 3";; esac
"""


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_topic_job_creates_every_topic_with_the_worker_partitions_and_replication(
    overlay: Path, tmp_path: Path
) -> None:
    docs = render(overlay)
    job = find(docs, "Job", "moderation-create-topics")
    create = container(job)
    sources = {next(iter(r.values()))["name"] for r in create["envFrom"]}
    env, topics = worker_env(docs), find(docs, "ConfigMap", "moderation-topics")["data"]
    assert {
        find(docs, "ConfigMap", WORKER)["metadata"]["name"],
        find(docs, "ConfigMap", "moderation-topics")["metadata"]["name"],
    } < sources
    assert create["command"] == ["/bin/sh", "/scripts/create-topics.sh"]
    script = find(docs, "ConfigMap", "moderation-create-topics-script")["data"]["create-topics.sh"]
    assert job["spec"]["ttlSecondsAfterFinished"] > 0
    # Run the very script against a stub kafka-topics.sh.
    (tmp_path / "create-topics.sh").write_text(script)
    stub = tmp_path / "kafka-topics.sh"
    stub.write_text(STUB)
    stub.chmod(0o755)
    log = tmp_path / "calls.log"
    partitions = env["MODERATION_KAFKA_TOPIC_PARTITIONS"]
    run_env = {
        **env,
        **topics,
        "MODERATION_KAFKA_SASL_PASSWORD": "s3cr3t",
        "KAFKA_TOPICS": str(stub),
        "STUB_LOG": str(log),
        "STUB_PARTITIONS": partitions,
        "TMPDIR": str(tmp_path),
        "PATH": os.environ["PATH"],
    }
    result = subprocess.run(["sh", str(tmp_path / "create-topics.sh")], env=run_env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "WARNING" not in result.stderr
    creates = [line.split() for line in log.read_text().splitlines() if "--create" in line]
    assert [c[c.index("--topic") + 1] for c in creates] == [env[f"MODERATION_TOPIC_{t}"] for t in TOPICS]
    assert {name for name in Settings.model_fields if name.startswith("topic_")} == {
        f"topic_{t.lower()}" for t in TOPICS
    }, "every topic setting is created"
    for name, c in zip(TOPICS, creates, strict=True):
        configs = {c[i + 1] for i, word in enumerate(c) if word == "--config"}
        assert c[c.index("--partitions") + 1] == partitions
        assert c[c.index("--replication-factor") + 1] == env["MODERATION_KAFKA_REPLICATION_FACTOR"]
        assert f"min.insync.replicas={env['MODERATION_KAFKA_MIN_INSYNC_REPLICAS']}" in configs
        if name in ("CACHE", "BANK"):
            assert "cleanup.policy=compact" in configs
        else:
            assert f"retention.ms={topics[f'TOPIC_{name}_RETENTION_MS']}" in configs
        assert c[c.index("--bootstrap-server") + 1] == env["MODERATION_KAFKA_BOOTSTRAP_SERVERS"]
        assert "--if-not-exists" in c
    props = (tmp_path / "client.properties").read_text()
    assert f"security.protocol={env.get('MODERATION_KAFKA_SECURITY_PROTOCOL', 'PLAINTEXT')}" in props
    if env.get("MODERATION_KAFKA_SECURITY_PROTOCOL", "").startswith("SASL"):
        assert f"sasl.mechanism={env['MODERATION_KAFKA_SASL_MECHANISM']}" in props
        assert "ScramLoginModule required" in props and 'password="s3cr3t"' in props
    # A topic that exists with another partition count is reported, not altered.
    run_env["STUB_PARTITIONS"] = "1"
    result = subprocess.run(["sh", str(tmp_path / "create-topics.sh")], env=run_env, capture_output=True, text=True)
    assert result.returncode == 0 and "WARNING: topic moderation.uploads has 1 partitions" in result.stderr
    assert "--alter" not in log.read_text()


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_topics_are_provisioned_with_replication_from_the_settings(overlay: Path) -> None:
    settings = Settings.model_validate(
        {k.removeprefix("MODERATION_").lower(): v for k, v in worker_env(render(overlay)).items()}
    )
    if overlay.name == "prod":  # provisioned by the Job or Strimzi; the worker may not create topics
        assert (settings.kafka_replication_factor, settings.kafka_min_insync_replicas) == (3, 2)
        assert not settings.kafka_declare_topics
    else:
        assert (settings.kafka_replication_factor, settings.kafka_min_insync_replicas) == (1, 1)


def test_strimzi_topics_match_prod() -> None:
    env = worker_env(render(DEPLOY / "overlays" / "prod"))
    topics = list(yaml.safe_load_all((DEPLOY / "topics" / "strimzi-kafkatopics.yaml").read_text()))
    assert [t["metadata"]["name"] for t in topics] == [env[f"MODERATION_TOPIC_{t}"] for t in TOPICS]
    for topic in topics:
        assert (topic["apiVersion"], topic["kind"]) == ("kafka.strimzi.io/v1beta2", "KafkaTopic")
        assert topic["spec"]["partitions"] == int(env["MODERATION_KAFKA_TOPIC_PARTITIONS"])
        assert topic["spec"]["replicas"] == int(env["MODERATION_KAFKA_REPLICATION_FACTOR"])
        assert topic["spec"]["config"]["min.insync.replicas"] == int(env["MODERATION_KAFKA_MIN_INSYNC_REPLICAS"])
    [cache] = [t for t in topics if t["metadata"]["name"] == env["MODERATION_TOPIC_CACHE"]]
    assert cache["spec"]["config"]["cleanup.policy"] == "compact"


def test_only_the_worker_and_explainer_principals_write_the_cache_topic() -> None:
    docs = render(DEPLOY / "overlays" / "prod")
    env, explainer_user = worker_env(docs), explainer_env(docs)["MODERATION_KAFKA_SASL_USERNAME"]
    users = list(yaml.safe_load_all((DEPLOY / "topics" / "strimzi-kafkausers.yaml").read_text()))
    assert all((u["apiVersion"], u["kind"]) == ("kafka.strimzi.io/v1beta2", "KafkaUser") for u in users)

    def allowed(user: dict[str, Any], operation: str, topic: str) -> bool:
        return any(
            acl["resource"]["type"] == "topic"
            and operation in acl["operations"]
            and (
                topic == acl["resource"]["name"]
                if acl["resource"]["patternType"] == "literal"
                else topic.startswith(acl["resource"]["name"])
            )
            for acl in user["spec"]["authorization"]["acls"]
        )

    def writers(topic: str) -> set[str]:
        return {u["metadata"]["name"] for u in users if allowed(u, "Write", topic) or allowed(u, "All", topic)}

    def group_readable(user: dict[str, Any], group: str) -> bool:
        literal = {"type": "group", "name": group, "patternType": "literal"}
        return any(
            acl["resource"] == literal and "Read" in acl["operations"] for acl in user["spec"]["authorization"]["acls"]
        )

    # The explainer writes back to the cache the verdicts it reads from explain requests: the chain holds
    # only while those requests (and the dead letters a replay copies back to them) come from our principals.
    worker_user = env["MODERATION_KAFKA_SASL_USERNAME"]
    cache = env["MODERATION_TOPIC_CACHE"]
    assert writers(cache) == {worker_user, explainer_user}
    assert writers(env["MODERATION_TOPIC_EXPLAIN_REQUESTS"]) == {worker_user}
    assert writers(env["MODERATION_TOPIC_DLQ"]) == {worker_user, explainer_user}
    [worker] = [u for u in users if u["metadata"]["name"] == worker_user]
    assert allowed(worker, "Read", cache) and allowed(worker, "Read", env["MODERATION_TOPIC_UPLOADS"])
    assert all(allowed(worker, "Write", env[f"MODERATION_TOPIC_{t}"]) for t in ("VERDICTS", "FLAGGED", "DLQ"))
    assert not any(allowed(worker, "Create", env[f"MODERATION_TOPIC_{t}"]) for t in TOPICS)
    [explainer] = [u for u in users if u["metadata"]["name"] == explainer_user]
    settings = settings_of(explainer_env(docs))
    assert allowed(explainer, "Read", settings.topic_explain_requests)
    assert group_readable(explainer, explainer_group(settings))
    assert allowed(explainer, "Write", settings.topic_explanations)
    assert not any(allowed(explainer, "Create", env[f"MODERATION_TOPIC_{t}"]) for t in TOPICS)
    assert not allowed(explainer, "Read", env["MODERATION_TOPIC_UPLOADS"])
