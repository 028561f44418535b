"""Scheduler: lanes -> earliest-deadline-first batch choice -> one engine thread.

    /generate -> lanes (student,1) (student,4) (teacher,64) ... -> engine free: the lane with
    the soonest `due`, after its window, runs <= max_batch images in the engine thread

- Lanes: one per (model, steps) (`lanes.py`), each with its cost per image-step.
- Batch formation happens when the engine frees up (or, idle, when a request arrives). The
  lane whose queued job has the earliest `due` goes next. A job's `due` is its own deadline
  (`deadline_s`, from deadline_ms) when given, else arrival + min(DUE_SLACK x its lane's batch
  time, timeout_s / 2): short students are due soon after they arrive, a long teacher batch
  later, so 1-step requests are not held behind 16-step or teacher work that arrived just
  before them, and nothing waits past timeout_s / 2 of priority.
- The window: at engine-free the lane's expected rows are what is queued plus the rows of the
  batch that just finished (its closed-loop clients come back). The batch runs when it holds
  those rows, or max_batch, or when the window ends: after the first client came back, no
  arrival for min(max_wait_s, wait_fraction x batch time); at most wait_fraction x the
  lane's batch time after engine-free (returning clients trickle in over tens of ms).
- Admission: a request costs n x steps x its lane's seconds per image-step. With
  max_backlog_s > 0, a request that would take queued plus running work over it is refused at
  once (Overloaded, 503 with Retry-After = the seconds over the bound); so is one with a
  deadline that its predicted completion (the work due before it + its own) misses.
- A request still queued at its deadline is dropped (DeadlineExceeded) without waiting for the
  engine; a cancelled one is dropped before its batch; a failing batch fails only its requests.
  Refusals are raised, not counted here: the HTTP layer answers and counts each one.
"""

from __future__ import annotations

import asyncio
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from .lanes import Job, Lane
from .metrics import Metrics
from .scheduler_run import execute

DUE_SLACK = 4.0  # a job without its own deadline is due after 4 of its lane's batch times


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


class Overloaded(QueueFull):
    """Queued engine work is over max_backlog_s, or the request's deadline cannot be met."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = max(1, math.ceil(retry_after_s))


class DeadlineExceeded(Exception):
    """The request waited in the queue past its deadline and was not run."""


class Draining(Exception):
    """The server is shutting down and accepts no new work."""


class BatchFailed(Exception):
    """The engine raised, or returned the wrong number of images, for this request's batch."""


@dataclass
class Result:
    images: torch.Tensor  # [n, C, H, W] float32 in [-1, 1]
    queue_s: float
    run_s: float
    batch_images: int  # images in the executed batch, this request's included
    predicted_s: float = 0.0  # predicted completion at admission (queue + run)


class Batcher:
    def __init__(self, engine, max_batch: int, max_wait_s: float, max_queue: int,
                 metrics: Metrics, wait_fraction: float = 0.1) -> None:
        self.engine, self.max_batch, self.max_queue = engine, max_batch, max_queue
        self.max_wait_s, self.wait_fraction, self.metrics = max_wait_s, wait_fraction, metrics
        self.lanes: dict[tuple[str, int], Lane] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="halfstep-engine")
        self._free_at, self._running_until = 0.0, 0.0  # last engine-free; running batch's end
        self._expected: dict[tuple[str, int], int] = {}  # rows each lane expects (window)
        self._busy_s, self._busy_since = 0.0, time.monotonic()

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="halfstep-batcher")

    async def call_in_engine_thread(self, fn, *args):
        """Run fn in the engine thread (warm-up shares the thread so it never races a batch)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def close(self, drain_s: float) -> int:
        """Stop accepting, finish queued and running batches for up to drain_s; returns how
        many queued requests had to be failed because the drain ran out of time."""
        self._closing = True
        self._wakeup.set()
        failed = 0
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_s)
            except asyncio.TimeoutError:
                self._task.cancel()
                for lane in self.lanes.values():
                    while lane.queue:
                        self._fail(lane.queue.popleft(),
                                   Draining("server shut down before this request ran"))
                        failed += 1
        self._executor.shutdown(wait=False)
        self._gauges()
        return failed

    @property
    def depth(self) -> int:
        return sum(len(lane.queue) for lane in self.lanes.values())

    @property
    def full(self) -> bool:
        return self.depth >= self.max_queue

    @property
    def closing(self) -> bool:
        return self._closing

    # -- estimates ------------------------------------------------------------------------
    def lane(self, key: tuple[str, int]) -> Lane:
        return self.lanes[key] if key in self.lanes else self.lanes.setdefault(key, Lane(key))

    def seed_run_times(self, run_s: dict[tuple[str, int], float]) -> None:
        """Start lanes' estimates from the engine's warm-up timings (Engine.warm_run_s)."""
        for key, seconds in run_s.items():
            self.lane(key).seed(float(seconds))

    def _default_image_step_s(self) -> float:
        """For a lane never measured: the slowest known cost per image-step (cautious)."""
        known = [lane.image_step_s for lane in self.lanes.values() if lane.image_step_s]
        return max(known, default=0.0)

    def cost_s(self, key: tuple[str, int], n: int) -> float:
        """Predicted engine seconds of n images of `key`."""
        return self.lane(key).cost_s(n, self._default_image_step_s())

    def wait_limit(self, key: tuple[str, int]) -> float:
        """How long a batch of `key` may wait for company (after engine-free or arrival)."""
        if self.wait_fraction == 0:
            return 0.0
        recent = self.lane(key).batch_s
        if recent is None:  # neither warmed up nor run yet: the configured bound alone
            return self.max_wait_s
        return min(self.max_wait_s, self.wait_fraction * recent)

    def backlog_s(self, due: float | None = None) -> float:
        """Engine seconds ahead: what is left of the running batch plus queued work (only the
        work due no later than `due`, when given: it runs first)."""
        now = time.monotonic()
        queued = sum(job.cost_s for lane in self.lanes.values() for job in lane.queue
                     if due is None or job.due <= due)
        return max(0.0, self._running_until - now) + queued

    def predict_s(self, key: tuple[str, int], n: int, deadline_s: float | None = None) -> float:
        """Seconds until a request of n images of `key`, submitted now, would be done."""
        due = time.monotonic() + self._relative_due(key, n, deadline_s)
        return self.backlog_s(due) + self.cost_s(key, n)

    def _relative_due(self, key: tuple[str, int], n: int, deadline_s: float | None,
                      timeout_s: float = math.inf) -> float:
        if deadline_s is not None:
            return deadline_s
        estimate = self.lane(key).batch_s or self.cost_s(key, n)
        return min(DUE_SLACK * estimate, timeout_s / 2)

    # -- requests -------------------------------------------------------------------------
    async def submit(self, key: tuple[str, int], noise: torch.Tensor, labels: torch.Tensor,
                     timeout_s: float, *, deadline_s: float | None = None,
                     max_backlog_s: float = 0.0) -> Result:
        """Queue one request and wait for its images. deadline_s: it must be done by then
        (refused at once if predicted not to be); max_backlog_s > 0 bounds queued work."""
        if self._closing:
            raise Draining("server is shutting down; retry on another replica")
        if self.full:
            raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
        n, now = int(noise.shape[0]), time.monotonic()
        cost = self.cost_s(key, n)
        if max_backlog_s > 0:
            backlog = self.backlog_s()
            if backlog + cost > max_backlog_s:
                raise Overloaded(f"queued work {backlog:.3f} s + this request {cost:.3f} s is "
                                 f"over the bound {max_backlog_s:g} s",
                                 backlog + cost - max_backlog_s)
        due = now + self._relative_due(key, n, deadline_s, timeout_s)
        predicted = self.backlog_s(due) + cost
        if deadline_s is not None and predicted > deadline_s:
            raise Overloaded(f"predicted completion {predicted * 1e3:.1f} ms misses the "
                             f"deadline {deadline_s * 1e3:.0f} ms", predicted - deadline_s)
        limit = timeout_s if deadline_s is None else min(timeout_s, deadline_s)
        job = Job(key, noise, labels, now, now + limit, due, cost,
                  asyncio.get_running_loop().create_future())
        self.lane(key).queue.append(job)
        self._gauges()
        self._wakeup.set()
        try:
            # shield: a deadline or cancellation must not cancel the shared future itself
            result = await asyncio.wait_for(asyncio.shield(job.future), limit)
        except asyncio.TimeoutError:
            if job.state == "queued":
                self._drop(job)
                raise DeadlineExceeded(
                    f"request waited {limit:g} s in the queue (the deadline) and was not run"
                ) from None
            result = await job.future  # already running: the deadline bounds queueing only
        except asyncio.CancelledError:
            if job.state == "queued":
                self._drop(job)
            else:
                job.state = "abandoned"  # running: its result is discarded
            raise
        result.predicted_s = predicted
        return result

    def _drop(self, job: Job) -> None:
        job.state = "dropped"
        self.lane(job.key).queue.remove(job)
        self._gauges()
        self._wakeup.set()  # the lane to run next may have changed

    def _fail(self, job: Job, exc: Exception) -> None:
        if job.state == "abandoned" or job.future.done():
            return  # nobody awaits it: setting an exception would only log a warning
        job.state = "done"
        job.future.set_exception(exc)

    def _gauges(self) -> None:
        m = self.metrics
        m.queue_depth.set(self.depth)
        for lane in self.lanes.values():
            m.lane_queue_depth.labels(lane.label).set(len(lane.queue))
            m.lane_backlog.labels(lane.label).set(lane.backlog_s)

    # -- the batch loop -------------------------------------------------------------------
    def _next_lane(self) -> Lane | None:
        """Earliest deadline first: the lane holding the queued job with the soonest due."""
        busy = [lane for lane in self.lanes.values() if lane.queue]
        return min(busy, key=lambda lane: min(j.due for j in lane.queue), default=None)

    async def _loop(self) -> None:
        while True:
            lane = self._next_lane()
            if lane is None:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            rows = lane.rows
            expected = min(self.max_batch, max(1, self._expected.get(lane.key, 1)))
            gap = self.wait_limit(lane.key)  # quiet time after the newest arrival
            first = max(self._free_at, min(job.enqueued for job in lane.queue))
            newest, cap = max(j.enqueued for j in lane.queue), max(gap, self.wait_fraction * (
                lane.batch_s or 0.0))  # before any client came back: the whole cap
            end = min(newest + gap, first + cap) if newest > self._free_at else first + cap
            wait = end - time.monotonic()
            if rows < expected and wait > 0 and not self._closing:
                self._wakeup.clear()  # woken early by a new request, a drop, or close()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            batch, images = lane.take(self.max_batch)
            for job in batch:
                lane.queue.remove(job)
                job.state = "running"
            self._gauges()
            await execute(self, lane, batch, images)
            self._free_at = time.monotonic()
            # closed-loop clients of this batch come back: expect them with what is queued
            self._expected = {k: other.rows + (images if other is lane else 0)
                              for k, other in self.lanes.items()}

    def _run(self, model: str, steps: int, noise: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Engine thread: one engine call per max_batch rows, then the output-count check."""
        parts = [
            self.engine.run(model, steps, noise[i: i + self.max_batch],
                            labels[i: i + self.max_batch])
            for i in range(0, noise.shape[0], self.max_batch)
        ]
        out = torch.cat(parts) if parts else noise[:0]
        if not isinstance(out, torch.Tensor) or out.shape[0] != noise.shape[0]:
            got = out.shape[0] if isinstance(out, torch.Tensor) else type(out).__name__
            raise BatchFailed(f"engine returned {got} images for {noise.shape[0]} inputs")
        return out
