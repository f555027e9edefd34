"""Turn a P(fake) score into an action and the topics the verdict goes to."""

from __future__ import annotations

from dataclasses import dataclass

from moderation.events import Action
from moderation.settings import Settings


@dataclass(frozen=True)
class Policy:
    review_threshold: float = 0.5
    flag_threshold: float = 0.8
    explain_above: float = 0.5

    @classmethod
    def from_settings(cls, settings: Settings) -> Policy:
        return cls(settings.review_threshold, settings.flag_threshold, settings.explain_above)

    def action(self, score: float) -> Action:
        if score >= self.flag_threshold:
            return "flag"
        if score >= self.review_threshold:
            return "review"
        return "allow"
