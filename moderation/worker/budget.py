"""A byte budget shared by the decode threads, so that the pixels in flight cannot outgrow the pod."""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager

# glibc's mallopt parameter, and the size from which an allocation gets its own mapping.
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 4 * 1024 * 1024


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


def return_large_frees() -> bool:
    """Have glibc serve every allocation of MMAP_THRESHOLD or more (pixel buffers: Pillow allocates 16 MB
    blocks) with its own mapping, unmapped when freed. By default glibc raises that threshold as large
    blocks are freed (up to 32 MB) and then keeps freed pixels in the freeing thread's arena, where the other
    decode threads cannot reuse them: each thread's worst image stays resident, and the pod's peak grows
    past what the byte budget admits (measured: 1,058 MB peak and 752 MB left resident after ten 50 MP
    images on two threads, 883 and 361 MB with this). False where the C library is not glibc."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    except (OSError, AttributeError):  # no C library by that name, or one without mallopt (musl)
        return False
