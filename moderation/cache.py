"""The verdict cache: identical bytes (sha256) reach the model once while their entry lives.

Every worker holds the cache in memory, bounded in entries (least recently used first out) and in age,
and fills it from the compacted cache topic that all workers publish to: a global table backed by its
changelog, so it is right across workers, rebalances and restarts. An entry only serves the model that
made it, and only when it carries an explanation the current policy would ask for.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from moderation.events import CacheEntry, ModelInfo


class VerdictCache:
    def __init__(self, max_entries: int, ttl_s: float, clock: Callable[[], float] = time.time) -> None:
        self.max_entries, self.ttl_s, self._clock = max_entries, ttl_s, clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sha256: str, *, model: ModelInfo, explain_above: float) -> CacheEntry | None:
        entry = self._entries.get(sha256)
        if entry is None:
            return None
        if self._expired(entry):
            del self._entries[sha256]
            return None
        if entry.model != model or (entry.explanation is None and entry.score >= explain_above):
            return None
        self._entries.move_to_end(sha256)
        return entry

    def put(self, entry: CacheEntry) -> None:
        if self._expired(entry):
            return
        self._entries[entry.image_sha256] = entry
        self._entries.move_to_end(entry.image_sha256)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def _expired(self, entry: CacheEntry) -> bool:
        return self._clock() - entry.decided_at.timestamp() > self.ttl_s
