"""Crash-only process handling: an unplanned failure ends the worker process, and so does a shutdown
that outlives its grace.

Faust's default supervisor restarts a crashed agent inside the same process on the same stream without
seeking back, so the events of the failed batch are never re-delivered and every later event waits
behind them. Ending the process instead lets Kubernetes restart it and the consumer group re-deliver
everything after the last committed offset, which only ever covers published outcomes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Coroutine
from typing import Any, NoReturn

import faust

log = logging.getLogger(__name__)

EXIT_CRASHED = 70  # EX_SOFTWARE: an unexpected failure; the orchestrator restarts the process
EXIT_SHUTDOWN_HUNG = 75  # EX_TEMPFAIL: SIGTERM's clean stop outlived the grace and was cut short
SHUTDOWN_MARGIN_S = 5.0  # on top of the drain grace: Faust's own stop (commit, leave group, close clients)


def crash(what: str, exc: BaseException | None = None) -> NoReturn:
    """One clear line, then end the process at once: no in-process restart, no clean-up that could hang."""
    log.critical(
        "worker crashed: %s%s; exiting %d so that it restarts and the group re-delivers from the committed offset",
        what,
        f": {type(exc).__name__}: {exc}" if exc is not None else "",
        EXIT_CRASHED,
        exc_info=exc,
    )
    _exit(EXIT_CRASHED)


async def crash_only(work: Awaitable[None], what: str) -> None:
    """An agent's work: cancelled, it stops (the worker is stopping, and `work` drained what it could); failed,
    the process ends, never Faust's in-process restart on the same stream."""
    try:
        await work
    except asyncio.CancelledError:
        raise
    except BaseException as exc:
        crash(what, exc)


def supervised(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A background task whose unexpected failure ends the worker, as a failing agent would."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            crash(f"the {name} task failed", exc)

    task = asyncio.create_task(work, name=name)
    task.add_done_callback(done)
    return task


def _exit(code: int) -> NoReturn:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class Worker(faust.Worker):
    """Faust's worker, whose stop on SIGTERM/SIGINT is bounded: the agent drains for the grace, Faust then
    commits and leaves the group, and if any of that hangs (a broker that went away) a watchdog ends the
    process `SHUTDOWN_MARGIN_S` later."""

    def __init__(self, *args: Any, shutdown_grace_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._shutdown_limit_s = shutdown_grace_s + SHUTDOWN_MARGIN_S

    def _schedule_shutdown(self, signal: Any) -> None:
        if not self._signal_stop_time:
            watchdog = threading.Timer(self._shutdown_limit_s, self._shutdown_hung)
            watchdog.daemon = True
            watchdog.start()
        super()._schedule_shutdown(signal)

    def _shutdown_hung(self) -> None:
        log.critical("shutdown still running after %.0f s; exiting %d", self._shutdown_limit_s, EXIT_SHUTDOWN_HUNG)
        _exit(EXIT_SHUTDOWN_HUNG)
