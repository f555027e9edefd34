"""Triton's manifests and the GPU model configs they serve: a GPU with memory enough for both models, the
Deployment and its weights volume (filled by the weights Job, kept when the overlays go), scaling on queue
time, the GPU configs in step with the CPU ones, a queue bounded so that overload sheds in time, and the
TensorRT-LLM layout a recipe that nothing deploys."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from moderation.settings import Settings
from tests.deploy.manifests import (
    DEPLOY,
    KUSTOMIZATIONS,
    MIB,
    OVERLAYS,
    PROD,
    ROOT,
    TRITON,
    WORKER,
    bench_summary,
    container,
    dockerfile,
    find,
    names,
    pod_spec,
    rel,
    render,
    worker_env,
)

MODEL_DIR = ROOT / "triton_models" / "fakevlm"
EXPLAIN_DIR = ROOT / "triton_models" / "fakevlm_explain"  # the same weights, another Triton model (issue 19)
MODEL_DIRS = (MODEL_DIR, EXPLAIN_DIR)


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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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
        assert 0 < drain_s < settings.triton_timeout_s, f"{rel(path)}: {queue} queued take {drain_s:.0f} s"
        assert queue >= settings.batch_size * settings.max_inflight_batches, rel(path)
    for path in (EXPLAIN_DIR / "config.pbtxt", EXPLAIN_DIR / "configs" / "gpu.pbtxt"):
        config = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        policy = config.dynamic_batching.default_queue_policy
        batch_s = 1 / explain_rate  # one full batch, generated together
        drain_s = policy.max_queue_size / (config.max_batch_size * explain_rate)
        assert 0 < drain_s < settings.triton_explain_timeout_s, f"{rel(path)}: takes {drain_s:.0f} s"
        # Refused once it waited too long: what is still computed finishes before the worker gives up.
        assert policy.timeout_action == model_config_pb2.ModelQueuePolicy.REJECT, rel(path)
        waited_s = policy.default_timeout_microseconds / 1e6
        assert 0 < waited_s + batch_s < settings.triton_explain_timeout_s, rel(path)
    args = container(find(prod, "Deployment", TRITON), "triton")["args"]
    assert "--metrics-config=summary_latencies=true" in args, "TritonQueueTimeHigh reads the queue-time summary"


RECIPE_ONLY = ("tensorrt_llm", "vision_encoder", "/models/engines", "fakevlm-hf", "triton_models/gpu")


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
def test_the_tensorrt_llm_layout_is_a_recipe_no_kustomization_deploys(directory: Path) -> None:
    """triton_models/gpu/ needs engines built on the serving GPU and volumes no manifest provides:
    it is documented as a recipe, and nothing under deploy/ (nor the Triton image) refers to it."""
    text = yaml.safe_dump_all(render(directory))
    assert not [word for word in RECIPE_ONLY if word in text]
    assert "triton_models/gpu" not in dockerfile("triton")
    for config in (ROOT / "triton_models" / "gpu").glob("*/config.pbtxt"):
        assert config.read_text().startswith("# RECIPE, not deployed"), rel(config)
