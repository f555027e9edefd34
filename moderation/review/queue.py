"""The reviewers' queue as the console sees it: review and flag verdicts, their explanations, and the decisions
taken on them.

Pure state, fed by `moderation.review.reader` from the review and decisions topics (in any order: a
decision may be read before the verdict it is about) and by the console right after the broker acked
a decision it published, so a decided item leaves the page at once. An item awaits review until a
confirm_fake or overturn_real decision; an escalate keeps it listed, marked escalated.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from dataclasses import dataclass, field

from moderation.events import Action, Decision, Explanation, Verdict

QUEUED_ACTIONS: frozenset[Action] = frozenset({"review", "flag"})
FINAL_DECISIONS = frozenset({"confirm_fake", "overturn_real"})


@dataclass
class Item:
    verdict: Verdict
    decisions: list[Decision] = field(default_factory=list)  # about this event_id, oldest first
    explained: Explanation | None = None  # from the explanations topic, once the explainer published it

    @property
    def explanation(self) -> str | None:
        """The text to show: what the verdict carried (a cache hit), else the explanation that came after it."""
        return self.verdict.explanation or (self.explained.explanation if self.explained else None)

    @property
    def explanation_pending(self) -> bool:
        return self.explanation is None and self.verdict.explanation_requested

    @property
    def event_id(self) -> str:
        return self.verdict.event_id

    @property
    def escalated(self) -> bool:
        return any(d.decision == "escalate" for d in self.decisions)

    @property
    def awaiting(self) -> bool:
        return not any(d.decision in FINAL_DECISIONS for d in self.decisions)


class ReviewQueue:
    """Verdicts by event_id (at most `max_items`, the oldest read dropped first) and every decision read,
    by event_id and by image sha256 (a decision is small; the history of an image must survive its item)."""

    def __init__(self, max_items: int = 100_000) -> None:
        self._max_items = max_items
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()
        self._by_event: defaultdict[str, list[Decision]] = defaultdict(list)
        self._by_image: defaultdict[str, list[Decision]] = defaultdict(list)
        self._explanations: OrderedDict[str, Explanation] = OrderedDict()  # may come before their verdicts

    def add_verdict(self, verdict: Verdict) -> bool:
        """Queue a review or flag verdict (a re-delivered one replaces the first); False for any other."""
        if verdict.action not in QUEUED_ACTIONS:
            return False
        self._verdicts.pop(verdict.event_id, None)
        self._verdicts[verdict.event_id] = verdict
        while len(self._verdicts) > self._max_items:
            self._verdicts.popitem(last=False)
        return True

    def add_decision(self, decision: Decision) -> bool:
        """Record a decision once: the console's own come back from the topic, and are not counted twice."""
        known = self._by_event[decision.event_id]
        if decision in known:
            return False
        known.append(decision)
        self._by_image[decision.image_sha256].append(decision)
        return True

    def add_explanation(self, explanation: Explanation) -> None:
        """Keep the latest explanation of an event (at least once: a re-explained one replaces the first)."""
        self._explanations.pop(explanation.event_id, None)
        self._explanations[explanation.event_id] = explanation
        while len(self._explanations) > self._max_items:
            self._explanations.popitem(last=False)

    def item(self, event_id: str) -> Item | None:
        verdict = self._verdicts.get(event_id)
        return None if verdict is None else self._item(verdict)

    def _item(self, verdict: Verdict) -> Item:
        event_id = verdict.event_id
        return Item(verdict, list(self._by_event.get(event_id, ())), self._explanations.get(event_id))

    def awaiting(self, *, tenant: str | None = None, action: str | None = None, limit: int = 200) -> list[Item]:
        """Items awaiting review, newest verdict first, of one tenant and one action when given."""
        items = [
            item
            for verdict in self._verdicts.values()
            if (tenant is None or verdict.tenant == tenant) and (action is None or verdict.action == action)
            if (item := self._item(verdict)).awaiting
        ]
        items.sort(key=lambda item: item.verdict.decided_at, reverse=True)
        return items[:limit]

    def history(self, item: Item) -> list[Decision]:
        """Earlier decisions about this event or about the same image bytes uploaded as another event."""
        seen = {*self._by_event.get(item.event_id, ()), *self._by_image.get(item.verdict.image_sha256, ())}
        return sorted(seen, key=lambda d: d.decided_at)

    def tenants(self) -> list[str]:
        return sorted({v.tenant for v in self._verdicts.values() if v.tenant is not None})

    def __len__(self) -> int:
        return len(self._verdicts)
