"""The worker's manifests: its ConfigMap holds valid, non-secret settings, its Deployment, memory from the measured
figures, KEDA scaling on lag, secrets and workload identity, the per-tenant policy file mounted and valid, and
the drain (the worker's and the explainer's) within the pod's termination grace period."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from moderation.settings import Settings
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
    pod_spec,
    quantity_mib,
    rel,
    render,
    settings_of,
    worker_env,
)


def _union_args(annotation: Any) -> tuple[Any, ...]:
    return getattr(annotation, "__args__", ())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_worker_configmap_holds_only_valid_non_secret_settings(overlay: Path) -> None:
    env = worker_env(render(overlay))
    fields = {f"MODERATION_{name.upper()}": name for name in Settings.model_fields}
    assert set(env) <= set(fields), f"not settings: {set(env) - set(fields)}"
    secret = {key for key, name in fields.items() if SecretStr in _union_args(Settings.model_fields[name].annotation)}
    assert secret == {
        "MODERATION_KAFKA_SASL_PASSWORD",
        "MODERATION_S3_SECRET_ACCESS_KEY",
        "MODERATION_REVIEW_TOKENS",
        "MODERATION_REVIEW_SESSION_SECRET",
    }
    assert not set(env) & secret, "credentials belong in the Secret"
    settings = Settings.model_validate({fields[key]: value for key, value in env.items()})  # values parse
    assert settings.metrics_port == 8080


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_worker_deployment(overlay: Path) -> None:
    docs = render(overlay)
    deployment, env = find(docs, "Deployment", WORKER), worker_env(docs)
    spec, worker = pod_spec(deployment), container(deployment, "worker")
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert worker["args"] == ["worker"]
    assert spec["serviceAccountName"] == WORKER
    # Env from the generated ConfigMap and the Secret.
    refs = {
        ("configMap" if "configMapRef" in r else "secret"): ref["name"] for r in worker["envFrom"] for ref in r.values()
    }
    assert refs["configMap"] == find(docs, "ConfigMap", WORKER)["metadata"]["name"]
    assert re.fullmatch(r"moderation-worker-secrets(-[a-z0-9]{10})?", refs["secret"])
    # Probes on the metrics port: /live for liveness and start-up, /ready for readiness.
    port = int(env["MODERATION_METRICS_PORT"])
    ports = {p["name"]: p["containerPort"] for p in worker["ports"]}
    assert ports == {"http": port}
    for probe, path in (("startupProbe", "/live"), ("livenessProbe", "/live"), ("readinessProbe", "/ready")):
        assert worker[probe]["httpGet"] == {"path": path, "port": "http"}, probe
    # Writable places are volumes (read-only root file system): Faust's data dir and /tmp.
    mounts = {m["mountPath"] for m in worker["volumeMounts"]}
    assert {env["MODERATION_DATA_DIR"], "/tmp"} <= mounts
    # It must outlive a batch that waits on Triton when told to stop.
    assert spec["terminationGracePeriodSeconds"] > Settings.model_fields["triton_timeout_s"].default
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


def worker_memory_mib(settings: Settings) -> float:
    """deploy/README.md "Sizing": the worker's RSS measured on ordinary uploads, plus what the
    settings let it hold at once (raw bytes and pixel tensors of every image in flight, the decode
    budget), with headroom."""
    base = bench_summary("worst_images-cpu.txt")["baseline_peak_rss_mib"]
    in_flight = settings.batch_size * settings.max_inflight_batches
    held = in_flight * (settings.s3_max_object_bytes + IMAGE_BYTES) / MIB
    return (base + held + settings.decode_budget_mib) * HEADROOM


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_worker_resources_come_from_the_measured_figures(overlay: Path) -> None:
    """Raising MODERATION_BATCH_SIZE, MODERATION_MAX_INFLIGHT_BATCHES, the byte cap or the decode
    budget in worker.env without raising the pod's memory fails here."""
    docs = render(overlay)
    env = worker_env(docs)
    settings = Settings.model_validate({k.removeprefix("MODERATION_").lower(): v for k, v in env.items()})
    resources = container(find(docs, "Deployment", WORKER), "worker")["resources"]
    needed = worker_memory_mib(settings)
    limit = quantity_mib(resources["limits"]["memory"])
    assert limit >= needed, f"worker memory limit {limit:.0f} MiB < {needed:.0f} MiB (deploy/README.md Sizing)"
    assert quantity_mib(resources["requests"]["memory"]) == limit, "requested in full: never OOM-killed by others"
    # The worker's worst-images peak (measured) fits with room to spare.
    assert bench_summary("worst_images-cpu.txt")["worst_peak_rss_mib"] < 0.5 * limit
    # CPU: one Python thread bound the worker at 0.9 to 1.0 core under backlog (README Performance).
    assert resources["requests"]["cpu"] in ("1", "1000m") and "cpu" not in resources["limits"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_worker_scales_on_lag_up_to_the_partition_count(overlay: Path) -> None:
    docs = render(overlay)
    scaled, env = find(docs, "ScaledObject", WORKER), worker_env(docs)
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == WORKER
    assert spec["scaleTargetRef"]["envSourceContainerName"] == "worker"
    trigger = kafka_lag_trigger(spec, int(env["MODERATION_KAFKA_TOPIC_PARTITIONS"]))
    meta = trigger["metadata"]
    # Broker, group and topic come from the worker's own settings, so they cannot drift.
    assert meta["bootstrapServersFromEnv"] == "MODERATION_KAFKA_BOOTSTRAP_SERVERS"
    assert meta["consumerGroupFromEnv"] == "MODERATION_KAFKA_CONSUMER_GROUP"
    assert meta["topicFromEnv"] == "MODERATION_TOPIC_UPLOADS"
    for key in ("bootstrapServersFromEnv", "consumerGroupFromEnv", "topicFromEnv"):
        assert meta[key] in env
    assert env["MODERATION_TOPIC_UPLOADS"] == "moderation.uploads"
    assert env["MODERATION_KAFKA_CONSUMER_GROUP"] == "moderation"
    assert_kafka_trigger_credentials(docs, trigger, env, "worker")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_secrets_and_workload_identity(overlay: Path) -> None:
    docs = render(overlay)
    env, account = worker_env(docs), find(docs, "ServiceAccount", WORKER)
    generated = [d for d in docs if d["kind"] == "Secret"]
    if overlay.name == "prod":
        # S3 through IRSA: no keys anywhere; the Kafka password Secret is created out of band.
        assert account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"].startswith("arn:aws:iam::")
        assert "MODERATION_S3_ACCESS_KEY_ID" not in env
        assert generated == []
        assert env["MODERATION_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
    else:  # the worker's and the explainer's (dev-only MinIO key, the same for both)
        assert len(generated) == 2
        secret = find(docs, "Secret", "moderation-worker-secrets")
        assert set(secret["data"]) == {"MODERATION_S3_SECRET_ACCESS_KEY"}
        assert "MODERATION_S3_ACCESS_KEY_ID" in env


POLICY_MOUNT = "/etc/moderation/policy"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_policy_configmap_is_mounted_as_a_directory_the_setting_points_into(overlay: Path) -> None:
    docs = render(overlay)
    [policy] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "moderation-policy"]
    deployment = find(docs, "Deployment", WORKER)
    [volume] = [v for v in pod_spec(deployment)["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == "moderation-policy", "no hash suffix: an edit reloads, never rolls out"
    [mount] = [m for m in container(deployment, "worker")["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount, "a subPath mount never sees an edit of the ConfigMap"
    assert mount["mountPath"] == POLICY_MOUNT and mount["readOnly"] is True
    path = Path(worker_env(docs)["MODERATION_POLICY_FILE"])
    assert path.parent == Path(POLICY_MOUNT) and path.name in policy["data"]


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_the_deployed_policy_passes_policy_check(overlay: Path, tmp_path: Path) -> None:
    """The file as rendered, over the worker's own settings, through `moderation policy check`."""
    docs = render(overlay)
    env = worker_env(docs)
    policy = tmp_path / "policy.yaml"
    policy.write_text(find(docs, "ConfigMap", "moderation-policy")["data"][Path(env["MODERATION_POLICY_FILE"]).name])
    settings = tmp_path / "worker.env"
    settings.write_text("".join(f"{k}={v}\n" for k, v in env.items() if k != "MODERATION_POLICY_FILE"))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MODERATION_")}
    result = subprocess.run(
        [sys.executable, "-m", "moderation", "policy", "check", str(policy), "--env-file", str(settings)],
        capture_output=True,
        text=True,
        env=clean | {"COLUMNS": "200"},
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"valid, \d+ tenants", result.stdout), result.stdout


# After the drain the worker still commits, leaves the group and closes its clients before it exits.
SHUTDOWN_MARGIN_S = 30


@pytest.mark.parametrize("deployment", [WORKER, EXPLAINER])
@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
def test_consumers_drain_within_the_pods_termination_grace_period(overlay: Path, deployment: str) -> None:
    """The worker drains its batches in flight, the explainer its batch in hand, for at most the grace."""
    docs = render(overlay)
    env = explainer_env(docs) if deployment == EXPLAINER else worker_env(docs)
    settings = settings_of(env)
    assert "MODERATION_SHUTDOWN_GRACE_S" in env, "the drain grace sits next to the pod that must outlast it"
    period = pod_spec(find(docs, "Deployment", deployment))["terminationGracePeriodSeconds"]
    assert settings.shutdown_grace_s + SHUTDOWN_MARGIN_S <= period, (
        f"MODERATION_SHUTDOWN_GRACE_S {settings.shutdown_grace_s:g} s + {SHUTDOWN_MARGIN_S} s to commit, leave the "
        f"group and close must fit in terminationGracePeriodSeconds {period}, or the kubelet SIGKILLs the drain"
    )
