"""A byte budget shared by the decode threads, so that the pixels in flight cannot outgrow the pod."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager


class ByteBudget:
    """A thread reserves an image's bytes before decoding it and releases them after; reservations are
    served first come, first served (a large image is not overtaken forever by small ones). One larger
    than the whole budget is cut down to it: any image within the pixel cap still decodes, alone."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError("a byte budget needs at least one byte")
        self.total = total
        self._used = 0
        self._line: deque[object] = deque()
        self._changed = threading.Condition()

    @property
    def in_use(self) -> int:
        with self._changed:
            return self._used

    @property
    def waiting(self) -> int:
        with self._changed:
            return len(self._line)

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[int]:
        """Hold `nbytes` (at most the whole budget) for the duration; waits while they do not fit."""
        share = max(0, min(nbytes, self.total))
        ticket = object()
        with self._changed:
            self._line.append(ticket)
            try:
                self._changed.wait_for(lambda: self._line[0] is ticket and self._used + share <= self.total)
            finally:
                self._line.remove(ticket)  # served, or interrupted: either way out of the line
            self._used += share
            self._changed.notify_all()  # the next in line may fit as well
        try:
            yield share
        finally:
            with self._changed:
                self._used -= share
                self._changed.notify_all()
