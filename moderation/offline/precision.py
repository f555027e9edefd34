"""How good were the model's calls, by the reviewers' decisions: `moderation precision`.

Precision of the model's "fake" calls per tenant (and per action): confirmed / (confirmed + overturned),
from the latest decision about each event. Escalations are counted, never scored; verdicts decided by
provenance, a bank match or an earlier review are reported apart, as they are not the model's calls.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from pydantic import BaseModel, ValidationError, computed_field

from moderation.adapters.kafka import read_to_end
from moderation.events import Decision
from moderation.settings import Settings

ALL = "(all tenants)"
NO_TENANT = "(none)"


class Tally(BaseModel):
    confirmed: int = 0  # the model said fake, a reviewer confirmed
    overturned: int = 0  # the model said fake, a reviewer said real
    escalated: int = 0
    not_the_models: int = 0  # decided by provenance, a match or a review: not scored
    model_said_real: int = 0  # reviewed although the model said real: not part of its fake-call precision

    @computed_field  # type: ignore[prop-decorator]
    @property
    def decided(self) -> int:
        return self.confirmed + self.overturned

    @computed_field  # type: ignore[prop-decorator]
    @property
    def precision(self) -> float | None:
        return self.confirmed / self.decided if self.decided else None

    def add(self, decision: Decision) -> None:
        if decision.decision == "escalate":
            self.escalated += 1
        elif decision.model_decided_by != "model":
            self.not_the_models += 1
        elif decision.model_label != "fake":
            self.model_said_real += 1
        elif decision.decision == "confirm_fake":
            self.confirmed += 1
        else:
            self.overturned += 1


class TenantReport(BaseModel):
    tenant: str
    overall: Tally
    by_action: dict[str, Tally]


class DecisionsReport(BaseModel):
    source: str
    decisions: int  # the latest per event
    tenants: list[TenantReport]  # ALL first, then by tenant

    def markdown(self) -> str:
        lines = [
            f"Model precision on its fake calls, by reviewer decisions ({self.decisions} events, from {self.source})",
            "",
            "| Tenant | Action | Precision | Confirmed | Overturned | Escalated | Not the model's | Model said real |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for tenant in self.tenants:
            rows = [("all", tenant.overall), *sorted(tenant.by_action.items())]
            for action, tally in rows:
                precision = "n/a" if tally.precision is None else f"{tally.precision:.1%}"
                lines.append(
                    f"| {tenant.tenant} | {action} | {precision} | {tally.confirmed} | {tally.overturned} | "
                    f"{tally.escalated} | {tally.not_the_models} | {tally.model_said_real} |"
                )
        return "\n".join(lines)


def precision_report(decisions: Iterable[Decision], source: str) -> DecisionsReport:
    latest: dict[str, Decision] = {}
    for decision in decisions:  # in topic order: a later decision about an event replaces the earlier
        latest[decision.event_id] = decision
    reports: dict[str, TenantReport] = {}
    for decision in latest.values():
        for tenant in (ALL, decision.tenant or NO_TENANT):
            report = reports.setdefault(tenant, TenantReport(tenant=tenant, overall=Tally(), by_action={}))
            report.overall.add(decision)
            report.by_action.setdefault(decision.model_action, Tally()).add(decision)
    ordered = sorted(reports.values(), key=lambda r: (r.tenant != ALL, r.tenant))
    return DecisionsReport(source=source, decisions=len(latest), tenants=ordered)


def read_file(path: Path) -> tuple[list[Decision], int]:
    """Decisions from a JSON-lines file (one Decision per line); returns them and the count of bad lines."""
    decisions, bad = [], 0
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                decisions.append(Decision.model_validate_json(line))
            except ValidationError:
                bad += 1
    return decisions, bad


async def read_topic(settings: Settings) -> tuple[list[Decision], int]:
    """Every decision on MODERATION_TOPIC_DECISIONS up to its end now (no consumer group, nothing committed)."""
    records = [r async for batch in read_to_end(settings, settings.topic_decisions) for r in batch]
    decisions, bad = [], 0
    for record in sorted(records, key=lambda r: r.timestamp):  # a later decision about an event replaces it
        try:
            decisions.append(Decision.model_validate_json(record.value or b""))
        except ValidationError:
            bad += 1
    return decisions, bad
