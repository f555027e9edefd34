"""Services, PodDisruptionBudgets and NetworkPolicies: they select the Deployments, and the worker and the explainer
reach only DNS, Kafka, S3 and Triton, the console only Kafka, S3 and DNS."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.deploy.manifests import (
    EXPLAINER,
    OVERLAYS,
    REVIEW,
    TRITON,
    WORKER,
    explainer_env,
    find,
    pod_spec,
    rel,
    render,
    selects,
    worker_env,
)


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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
