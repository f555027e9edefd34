"""The explainer's manifests: its Deployment (the worker's image and hardening, its own principal and group), its
memory from the settings, KEDA scaling on its group's lag."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from moderation.settings import Settings
from moderation.worker.explainer import explainer_group
from tests.deploy.manifests import (
    EXPLAINER,
    HEADROOM,
    IMAGE_BYTES,
    MIB,
    OVERLAYS,
    WORKER,
    assert_kafka_trigger_credentials,
    bench_summary,
    container,
    explainer_env,
    find,
    kafka_lag_trigger,
    names,
    pod_spec,
    quantity_mib,
    rel,
    render,
    settings_of,
    worker_env,
)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_explainer_deployment(overlay: Path) -> None:
    docs = render(overlay)
    deployment, worker = find(docs, "Deployment", EXPLAINER), find(docs, "Deployment", WORKER)
    spec, explainer = pod_spec(deployment), container(deployment, "explainer")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert explainer["image"] == container(worker, "worker")["image"], "the worker image runs the explainer"
    assert explainer["args"] == ["explainer"]
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
    # The worker's hardening: same user, read-only root, /tmp an emptyDir, no API token.
    assert spec["securityContext"] == pod_spec(worker)["securityContext"]
    assert explainer["securityContext"] == container(worker, "worker")["securityContext"]
    [tmp] = [m for m in explainer["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])
    assert spec["serviceAccountName"] == EXPLAINER and spec["automountServiceAccountToken"] is False
    assert find(docs, "ServiceAccount", EXPLAINER)["automountServiceAccountToken"] is False
    # Env: the worker's ConfigMap (topics, Kafka, S3, Triton, decoding) and the explainer's own Secret.
    refs = [(kind, ref["name"]) for r in explainer["envFrom"] for kind, ref in r.items()]
    assert refs[0] == ("configMapRef", find(docs, "ConfigMap", WORKER)["metadata"]["name"])
    assert refs[1][0] == "secretRef" and re.fullmatch(r"moderation-explainer-secrets(-[a-z0-9]{10})?", refs[1][1])
    env = explainer_env(docs)
    settings = settings_of(env)  # the explainer's settings parse, its timeouts agree
    assert env["MODERATION_TOPIC_EXPLAIN_REQUESTS"] == "moderation.explain-requests"
    assert env["MODERATION_TOPIC_EXPLANATIONS"] == "moderation.explanations"
    assert settings.triton_explain_model == "fakevlm_explain" != settings.triton_model
    # Probes on the metrics port: /live for liveness and start-up, /ready for readiness.
    assert {p["name"]: p["containerPort"] for p in explainer["ports"]} == {"http": settings.metrics_port}
    for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        assert explainer[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # /live is served once the clients are open, which waits for the model: start-up outlasts that wait.
    startup = explainer["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] > settings.triton_startup_timeout_s
    # /live turns red past MODERATION_ACK_STALL_S with a batch in hand: never while a batch may still
    # legitimately wait out an outage, and the group would have dropped it by the poll interval anyway.
    assert settings.worst_explain_batch_s < settings.ack_stall_s < settings.kafka_max_poll_interval_s
    generated = names(docs, "Secret")
    if overlay.name == "prod":
        # Its own Kafka principal (ACLs in strimzi-kafkausers.yaml) and its own IRSA role; no Secret generated.
        assert env["MODERATION_KAFKA_SASL_USERNAME"] == EXPLAINER != worker_env(docs)["MODERATION_KAFKA_SASL_USERNAME"]
        role, worker_role = (
            find(docs, "ServiceAccount", name)["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
            for name in (EXPLAINER, WORKER)
        )
        assert role.startswith("arn:aws:iam::") and role != worker_role
        assert not any(n.startswith("moderation-explainer-secrets") for n in generated)
        assert "MODERATION_S3_ACCESS_KEY_ID" not in env
    else:
        secret = find(docs, "Secret", "moderation-explainer-secrets")
        assert set(secret["data"]) == {"MODERATION_S3_SECRET_ACCESS_KEY"} and "MODERATION_S3_ACCESS_KEY_ID" in env


def explainer_memory_mib(settings: Settings) -> float:
    """deploy/README.md "Sizing": the worker's measured base RSS (same image and imports, no Faust app: an
    upper bound), plus what one batch of explain requests holds at once (the raw bytes and pixel tensor of
    each request's image, the decode budget), with the worker's headroom."""
    base = bench_summary("worst_images-cpu.txt")["baseline_peak_rss_mib"]
    held = settings.explain_batch_size * (settings.s3_max_object_bytes + IMAGE_BYTES) / MIB
    return (base + held + settings.decode_budget_mib) * HEADROOM


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_explainer_resources_come_from_the_settings(overlay: Path) -> None:
    """Raising MODERATION_EXPLAIN_BATCH_SIZE, the byte cap or the decode budget without raising the
    explainer's memory fails here; so does a limit far above the arithmetic."""
    docs = render(overlay)
    settings = settings_of(explainer_env(docs))
    resources = container(find(docs, "Deployment", EXPLAINER), "explainer")["resources"]
    needed = explainer_memory_mib(settings)
    limit = quantity_mib(resources["limits"]["memory"])
    assert needed <= limit <= needed * 1.1, f"explainer memory {limit:.0f} MiB, the arithmetic says {needed:.0f} MiB"
    assert quantity_mib(resources["requests"]["memory"]) == limit, "requested in full: never OOM-killed by others"
    # CPU: bound by Triton's generation, a few explanations a second at ~4.3 ms of CPU each; no limit.
    assert resources["requests"]["cpu"] == "100m" and "cpu" not in resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_explainer_scales_on_its_groups_lag_up_to_the_partition_count(overlay: Path) -> None:
    docs = render(overlay)
    env = explainer_env(docs)
    settings = settings_of(env)
    spec = find(docs, "ScaledObject", EXPLAINER)["spec"]
    assert spec["scaleTargetRef"] == {"name": EXPLAINER, "envSourceContainerName": "explainer"}
    trigger = kafka_lag_trigger(spec, settings.kafka_topic_partitions)
    meta = trigger["metadata"]
    # The group the explainer really joins, derived from this overlay's settings as the explainer derives it;
    # and the defaults' (what the README and the ACLs name).
    assert meta["consumerGroup"] == explainer_group(settings) == explainer_group(Settings()) == EXPLAINER
    assert "consumerGroupFromEnv" not in meta
    assert meta["bootstrapServersFromEnv"] == "MODERATION_KAFKA_BOOTSTRAP_SERVERS" in env
    assert meta["topicFromEnv"] == "MODERATION_TOPIC_EXPLAIN_REQUESTS" in env
    assert env[meta["topicFromEnv"]] == settings.topic_explain_requests == Settings().topic_explain_requests
    assert_kafka_trigger_credentials(docs, trigger, env, "explainer")
