"""The console's Prometheus metrics, on its own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

REGISTRY = CollectorRegistry()
DECISIONS = Counter("moderation_review_decisions", "Decisions published, by decision.", ["decision"], registry=REGISTRY)
REFUSED = Counter(
    "moderation_review_refusals",
    "Requests refused (anonymous, cross-site, unknown item, broker down...), by status.",
    ["status"],
    registry=REGISTRY,
)
AWAITING = Gauge(
    "moderation_review_items_awaiting", "Items awaiting a decision in this console's queue.", registry=REGISTRY
)
READER_UP = Gauge("moderation_review_reader_up", "1 while the queue reader follows its topics.", registry=REGISTRY)
