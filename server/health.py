"""The scheduler's health: a stalled batch (the watchdog in `scheduler_run.py`) or the batch
loop ending for any reason marks it failed; everything waiting is answered 503 (Unhealthy),
new work is refused, and /healthz answers 503 with the reason so the pod restarts.

Mixed into `Batcher`, which holds the queues (`lanes`), `runs` and `running`.
"""

from __future__ import annotations

import asyncio
import logging

from .lanes import Job, Lane
from .outcomes import Unhealthy

log = logging.getLogger("halfstep.server")


class Health:
    lanes: dict[tuple[str, str, int], Lane]  # (bundle, model, steps)
    runs: list
    running: list[Job]
    failure: str | None
    _closing: bool
    _wakeup: asyncio.Event

    def fail_scheduler(self, reason: str) -> None:
        """Mark the scheduler failed (first reason kept) and fail everything waiting."""
        if self.failure is None:
            self.failure = reason
            log.error("scheduler failed: %s", reason)
        self.fail_all(Unhealthy(f"{self.failure}; this server is restarting, retry elsewhere"))

    def fail_all(self, exc: Exception) -> int:
        """Answer every queued, part-run and running request with `exc` (its engine work, if
        any, is left to finish unseen); returns how many there were."""
        jobs = [job for lane in self.lanes.values() for job in lane.queue]
        jobs += [job for run in self.runs for job in run.jobs] + self.running
        for lane in self.lanes.values():
            lane.queue.clear()
        self.runs.clear()
        waiting = [job for job in jobs if job.state != "abandoned" and not job.future.done()]
        for job in waiting:
            self._fail(job, exc)
        self._gauges()
        self._wakeup.set()
        return len(waiting)

    def _loop_ended(self, task: asyncio.Task) -> None:
        """The batch loop ended: unless it was told to (close), the scheduler has failed."""
        if task.cancelled():
            reason = None if self._closing else "the batch loop was cancelled"
        elif task.exception() is not None:
            exc = task.exception()
            reason = f"the batch loop crashed: {type(exc).__name__}: {exc}"
        else:
            reason = None if self._closing else "the batch loop ended"
        if reason is not None or self.failure is not None:
            self.fail_scheduler(reason or self.failure or "")
