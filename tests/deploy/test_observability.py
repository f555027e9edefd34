"""deploy/observability/: the dashboard, alert rules, recording rules and KEDA queries name only metrics and labels
the worker, the console, Triton or KEDA export (deploy/observability/*-metrics.txt); the alerts link their
runbooks; the ServiceMonitors scrape the Services; promtool parses every expression (skipped without it)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
import yaml

from moderation.errors import RETRYABLE, Reason
from tests.deploy.manifests import (
    DEPLOY,
    EXPLAINER,
    OVERLAYS,
    REVIEW,
    ROOT,
    TRITON,
    WORKER,
    find,
    rel,
    render,
    selects,
)

OBSERVABILITY = DEPLOY / "observability"
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
                    exprs[f"{rel(overlay)} {trigger['name']}"] = trigger["metadata"]["query"]
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


@pytest.mark.parametrize("overlay", OVERLAYS, ids=rel)
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
