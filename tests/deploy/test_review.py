"""The review console's manifests: its Deployment and Service (the worker's image and hardening, its own principal,
no committed tokens) and its memory from the measured figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from moderation.settings import Settings
from tests.deploy.manifests import (
    DEPLOY,
    HEADROOM,
    MIB,
    OVERLAYS,
    PROD,
    REVIEW,
    WORKER,
    container,
    find,
    names,
    pod_spec,
    quantity_mib,
    rel,
    render,
    worker_env,
)

# Measured (deploy/README.md "The review console"): the console's RSS after its imports and app, and the
# RSS one queued verdict adds (pydantic objects, FakeVLM explanation of 200-500 characters).
REVIEW_BASE_MIB = 73
REVIEW_VERDICT_BYTES = 8 * 1024
REVIEW_KAFKA_FETCH_MIB = 24  # aiokafka's 1 MiB per partition, review and decisions topics at 12 each
REVIEW_IMAGES_IN_FLIGHT = 8  # each held twice (S3 body, response) at most at the S3 byte cap


def review_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The console's environment: the worker's ConfigMap overridden by its own `env`."""
    explicit = {e["name"]: e["value"] for e in container(find(docs, "Deployment", REVIEW), "review").get("env", [])}
    return worker_env(docs) | explicit


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_review_console_deployment(overlay: Path) -> None:
    docs = render(overlay)
    deployment, worker = find(docs, "Deployment", REVIEW), find(docs, "Deployment", WORKER)
    spec, review = pod_spec(deployment), container(deployment, "review")
    # Its own image (worker.Dockerfile with LOCK=review: no Faust), released with the worker's tag.
    worker_image = container(worker, "worker")["image"]
    assert review["image"] == worker_image.replace("/moderation/worker:", "/moderation/review:"), review["image"]
    assert review["args"] == ["review", "serve", "--host", "0.0.0.0", "--port", "8090"]
    assert {p["name"]: p["containerPort"] for p in review["ports"]} == {"http": 8090}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert review[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # The worker's hardening: same user, read-only root, /tmp an emptyDir, no API token.
    assert spec["securityContext"] == pod_spec(worker)["securityContext"]
    assert review["securityContext"] == container(worker, "worker")["securityContext"]
    [tmp] = [m for m in review["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in next(v for v in spec["volumes"] if v["name"] == tmp["name"])
    assert spec["serviceAccountName"] == REVIEW and spec["automountServiceAccountToken"] is False
    assert find(docs, "ServiceAccount", REVIEW)["automountServiceAccountToken"] is False
    # Env: the worker's ConfigMap (topics, Kafka, S3) and the console's Secret, which no overlay generates.
    refs = [(kind, ref["name"]) for r in review["envFrom"] for kind, ref in r.items()]
    assert refs == [
        ("configMapRef", find(docs, "ConfigMap", WORKER)["metadata"]["name"]),
        ("secretRef", "moderation-review-secrets"),
    ]
    assert "moderation-review-secrets" not in names(docs, "Secret"), "reviewer tokens are never committed"
    env = review_env(docs)
    assert not {"MODERATION_REVIEW_TOKENS", "MODERATION_REVIEW_SESSION_SECRET"} & set(env)
    fields = {f"MODERATION_{name.upper()}": name for name in Settings.model_fields}
    Settings.model_validate({fields[k]: v for k, v in env.items()})  # the console's settings parse
    # Two replicas that share nothing but the session key; a PDB keeps one through drains.
    assert deployment["spec"]["replicas"] == 2
    service = find(docs, "Service", REVIEW)
    assert service["spec"]["type"] == "ClusterIP"
    assert service["spec"]["ports"] == [{"name": "http", "port": 8090, "targetPort": "http", "protocol": "TCP"}]
    if overlay.name == "prod":
        # Reviewers come through the proxy's header; Kafka as the console's own principal, S3 by IRSA.
        assert env["MODERATION_REVIEW_IDENTITY_HEADER"] == "X-Auth-Request-Email"
        assert (
            env["MODERATION_KAFKA_SASL_USERNAME"]
            == "moderation-review"
            != worker_env(docs)["MODERATION_KAFKA_SASL_USERNAME"]
        )
        role = find(docs, "ServiceAccount", REVIEW)["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert role.startswith("arn:aws:iam::")
        users = {
            u["metadata"]["name"]
            for u in yaml.safe_load_all((DEPLOY / "topics" / "strimzi-kafkausers.yaml").read_text())
        }
        assert "moderation-review" in users


def test_review_console_memory_comes_from_the_measured_figures() -> None:
    docs = render(PROD)
    env = review_env(docs)
    fields = {f"MODERATION_{name.upper()}": name for name in Settings.model_fields}
    settings = Settings.model_validate({fields[k]: v for k, v in env.items()})
    images = REVIEW_IMAGES_IN_FLIGHT * 2 * settings.s3_max_object_bytes / MIB
    verdicts = settings.review_max_items * REVIEW_VERDICT_BYTES / MIB
    needed = (REVIEW_BASE_MIB + verdicts + REVIEW_KAFKA_FETCH_MIB + images) * HEADROOM
    resources = container(find(docs, "Deployment", REVIEW), "review")["resources"]
    request, limit = quantity_mib(resources["requests"]["memory"]), quantity_mib(resources["limits"]["memory"])
    assert request == limit, "requested in full"
    assert needed <= limit <= needed * 1.1, f"memory {limit:.0f} MiB, the arithmetic says {needed:.0f} MiB"
