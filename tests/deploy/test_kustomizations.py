"""Every kustomization under deploy/ renders with a real kustomize (`kubectl kustomize`) into known objects, one
namespace per deployable unit; every built-in object validates against the Kubernetes API schemas
(kubernetes-validate, strict); every pod is hardened."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from tests.deploy.manifests import KUSTOMIZATIONS, OVERLAYS, PROD, names, pod_spec, rel, render

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


def pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[dict[str, Any]]:
    yield from (d for d in docs if d["kind"] in ("Deployment", "Job"))


def test_kustomizations_found() -> None:
    assert {rel(p) for p in OVERLAYS} == {"deploy/overlays/dev", "deploy/overlays/prod"}
    assert {PROD / "weights", PROD / "cluster"} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
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
        assert names(docs, "Namespace") == owned, rel(directory)


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=rel)
def test_builtin_objects_validate_strictly(directory: Path, version: str) -> None:
    for doc in render(directory):
        if doc["apiVersion"] in BUILTIN_API_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} at {path}: {exc.message}")


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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
