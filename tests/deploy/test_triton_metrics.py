"""The Triton metrics that deploy/ relies on (deploy/observability/triton-metrics.txt) are the ones a
real tritonserver exports: scrape the local stack's Triton, serving the fakevlm model."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from moderation.devkit import localstack

pytestmark = pytest.mark.integration

LISTED = Path(__file__).resolve().parents[2] / "deploy" / "observability" / "triton-metrics.txt"


def scrape(url: str, patience_s: float = 30.0) -> str:
    """Triton opens its metrics port a moment after gRPC reports the model ready: retry briefly."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return str(response.read().decode())
        except urllib.error.URLError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def test_listed_triton_metrics_are_exported(stack: localstack.StackInfo) -> None:
    assert stack.triton_metrics_url
    text = scrape(stack.triton_metrics_url)
    types = dict(re.findall(r"^# TYPE (\w+) (\w+)$", text, flags=re.MULTILINE))
    series = set(re.findall(r'^(\w+)\{[^}]*model="fakevlm"', text, flags=re.MULTILINE))
    rows = [line.split() for line in LISTED.read_text().splitlines() if line.strip() and not line.startswith("#")]
    scraped = [(name, kind) for name, kind, source in rows if source == "scraped"]
    assert scraped, "nothing in triton-metrics.txt is marked scraped"
    for name, kind in scraped:
        assert types.get(name) == kind, f"{name}: Triton exports type {types.get(name)}, the list says {kind}"
        assert name in series, f"{name} has no series for model fakevlm"
    # GPU metrics exist only with a GPU (DCGM): here they must be absent, not misspelled elsewhere.
    assert {source for _, _, source in rows} == {"scraped", "gpu"}
