"""The alert rules (deploy/observability/alerts.yaml) fire as intended on synthetic series: Prometheus'
own rule engine (`promtool test rules`) runs deploy/observability/tests/alerts-test.yaml. promtool is
not on PyPI: Debian's package `prometheus` ships it (.ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
RULES, UNIT_TESTS = OBSERVABILITY / "alerts.yaml", OBSERVABILITY / "tests" / "alerts-test.yaml"


def _alerts() -> dict[str, dict[str, Any]]:
    spec = yaml.safe_load(RULES.read_text())["spec"]
    return {r["alert"]: r for group in spec["groups"] for r in group["rules"] if "alert" in r}


def _cases() -> list[dict[str, Any]]:
    return [case for test in yaml.safe_load(UNIT_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]


def test_every_alert_is_unit_tested_firing_with_its_severity() -> None:
    alerts, cases = _alerts(), _cases()
    assert {case["alertname"] for case in cases} <= set(alerts), "a test names an alert that does not exist"
    for name, rule in alerts.items():
        fired = [a for case in cases if case["alertname"] == name for a in case["exp_alerts"]]
        assert fired, f"{name}: no unit test where it fires"
        assert all(a["exp_labels"]["severity"] == rule["labels"]["severity"] for a in fired), name
        assert any(case["alertname"] == name and not case["exp_alerts"] for case in cases), f"{name}: never silent"


def test_promtool_unit_tests_pass(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")
    spec = yaml.safe_load(RULES.read_text())["spec"]
    for group in spec["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)  # their text is checked by test_observability.py and promtool check
    (tmp_path / "moderation-rules.yml").write_text(yaml.safe_dump(spec))
    shutil.copy(UNIT_TESTS, tmp_path / UNIT_TESTS.name)
    result = subprocess.run(
        [promtool, "test", "rules", UNIT_TESTS.name], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
