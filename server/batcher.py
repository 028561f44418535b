"""Dynamic batcher: one bounded queue, batches keyed by (model, steps), one engine thread.

Stages: queue -> batch -> run -> split, with a check that the engine returned one image per
input.
- A batch takes queued requests of the oldest request's key, in arrival order, up to
  `max_batch` images; it runs when full or when the oldest request has waited `max_wait_s`, or
  `wait_fraction` x the key's recent batch time (a moving average over its batches) if that is
  shorter. A lone request's latency is then about (1 + wait_fraction) x its batch time at most:
  fast students wait a little, slow teacher batches wait the full max_wait_s. wait_fraction 0:
  never wait.
- A full queue refuses at once (QueueFull). A request still queued at its deadline is removed
  and answers DeadlineExceeded at once, without waiting for the engine to free up; it never
  runs.
- A cancelled request (client gone) is removed from the queue before its batch runs, so the
  loop never waits on, or runs, work nobody will read.
- A batch that raises fails only its own requests (BatchFailed); the loop keeps going.
- Model execution happens in one dedicated thread, never on the event loop.

Refusals are raised, not counted here: the HTTP layer answers and counts each one.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from .metrics import Metrics


class QueueFull(Exception):
    """The queue holds max_queue requests already."""


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


@dataclass(eq=False)
class Job:
    key: tuple[str, int]
    noise: torch.Tensor
    labels: torch.Tensor
    enqueued: float
    deadline: float
    future: asyncio.Future
    state: str = "queued"  # queued -> running -> done, or queued -> dropped
    started: float = field(default=0.0)

    @property
    def n(self) -> int:
        return int(self.noise.shape[0])


class Batcher:
    def __init__(self, engine, max_batch: int, max_wait_s: float, max_queue: int,
                 metrics: Metrics, wait_fraction: float = 0.1) -> None:
        self.engine = engine
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.wait_fraction = wait_fraction
        self._recent_run_s: dict[tuple[str, int], float] = {}  # moving average per key
        self.max_queue = max_queue
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="halfstep-engine")

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
                while self._queue:
                    job = self._queue.popleft()
                    self._fail(job, Draining("server shut down before this request ran"))
                    failed += 1
        self._executor.shutdown(wait=False)
        self.metrics.queue_depth.set(0)
        return failed

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def full(self) -> bool:
        return len(self._queue) >= self.max_queue

    @property
    def closing(self) -> bool:
        return self._closing

    # -- requests -------------------------------------------------------------------------
    async def submit(self, key: tuple[str, int], noise: torch.Tensor, labels: torch.Tensor,
                     timeout_s: float) -> Result:
        if self._closing:
            raise Draining("server is shutting down; retry on another replica")
        if self.full:
            raise QueueFull(f"queue is full ({self.max_queue} requests waiting)")
        now = time.monotonic()
        job = Job(key, noise, labels, now, now + timeout_s,
                  asyncio.get_running_loop().create_future())
        self._queue.append(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()
        try:
            # shield: a deadline or cancellation must not cancel the shared future itself
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except asyncio.TimeoutError:
            if job.state == "queued":
                self._drop(job)
                raise DeadlineExceeded(
                    f"request waited {timeout_s:g} s in the queue (the deadline) and was not run"
                ) from None
            return await job.future  # already running: the deadline bounds queueing only
        except asyncio.CancelledError:
            if job.state == "queued":
                self._drop(job)
            else:
                job.state = "abandoned"  # running: its result is discarded
            raise

    def _drop(self, job: Job) -> None:
        job.state = "dropped"
        self._queue.remove(job)
        self.metrics.queue_depth.set(len(self._queue))
        self._wakeup.set()  # the oldest request may have changed

    def _fail(self, job: Job, exc: Exception) -> None:
        if job.state == "abandoned" or job.future.done():
            return  # nobody awaits it: setting an exception would only log a warning
        job.state = "done"
        job.future.set_exception(exc)

    # -- the batch loop -------------------------------------------------------------------
    def _collect(self) -> tuple[list[Job], int]:
        """The oldest request plus later ones of its key that still fit, in arrival order."""
        oldest = self._queue[0]
        batch, images = [oldest], oldest.n
        for job in list(self._queue)[1:]:
            if job.key == oldest.key and images + job.n <= self.max_batch:
                batch.append(job)
                images += job.n
        return batch, images

    async def _loop(self) -> None:
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch, images = self._collect()
            wait = batch[0].enqueued + self.wait_limit(batch[0].key) - time.monotonic()
            if images < self.max_batch and wait > 0 and not self._closing:
                self._wakeup.clear()  # woken early by a new request, a drop, or close()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            for job in batch:
                self._queue.remove(job)
                job.state = "running"
            self.metrics.queue_depth.set(len(self._queue))
            await self._execute(batch, images)

    def seed_run_times(self, run_s: dict[tuple[str, int], float]) -> None:
        """Start keys' moving averages from the engine's warm-up timings (Engine.warm_run_s),
        so the first request of a warmed key does not wait the whole max_wait_s."""
        for key, seconds in run_s.items():
            self._recent_run_s.setdefault(key, float(seconds))

    def wait_limit(self, key: tuple[str, int]) -> float:
        """How long a batch of `key` may wait for company after its oldest request arrived."""
        if self.wait_fraction == 0:
            return 0.0
        recent = self._recent_run_s.get(key)
        if recent is None:  # neither warmed up nor run yet: the configured bound alone
            return self.max_wait_s
        return min(self.max_wait_s, self.wait_fraction * recent)

    async def _execute(self, batch: list[Job], images: int) -> None:
        started = time.monotonic()
        model, steps = batch[0].key
        for job in batch:
            self.metrics.queue_wait.observe(started - job.enqueued)
        self.metrics.batch_size.observe(images)
        noise = torch.cat([job.noise for job in batch])
        labels = torch.cat([job.labels for job in batch])
        try:
            out = await self.call_in_engine_thread(self._run, model, steps, noise, labels)
        except Exception as exc:  # the engine's failure is this batch's, not the server's
            for job in batch:
                self._fail(job, BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        run_s = time.monotonic() - started
        self.metrics.batch_duration.observe(run_s)
        previous = self._recent_run_s.get(batch[0].key, run_s)
        self._recent_run_s[batch[0].key] = 0.8 * previous + 0.2 * run_s
        offset = 0
        for job in batch:
            part = out[offset: offset + job.n]
            offset += job.n
            if job.state == "abandoned" or job.future.done():
                continue
            job.state = "done"
            job.future.set_result(Result(part, started - job.enqueued, run_s, images))

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
