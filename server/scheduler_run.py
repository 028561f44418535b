"""The run-and-split stage of the scheduler: one chosen batch (or one teacher chunk) through the
engine thread, under the watchdog.

Whole batches: concatenate the jobs' noise and labels, run them, split the images back per job,
and fold the measured time into the lane's estimates and the metrics. A teacher batch on an
engine that can run it in slices (`Engine.run_chunk`) is a `TeacherRun` instead: it advances
`chunk_steps` steps per turn, keeping its z between turns, so student batches run in between;
at each chunk boundary its requests past their deadline (504) or abandoned by their client
are dropped, and the run stops once none is left.

Watchdog: a call running longer than max(watchdog_factor x its predicted time, watchdog_min_s),
counted from when the engine thread begins it (not while it waits behind a warm-up), fails its
requests with 503 and marks the scheduler failed (/healthz 503: the pod restarts).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .engine_thread import run_limited
from .lanes import Job, Lane
from .outcomes import BatchFailed, DeadlineExceeded, Result, Unhealthy

if TYPE_CHECKING:
    from .batcher import Batcher

BUSY_WINDOW_S = 5.0  # halfstep_engine_busy_fraction is busy time over about this window


class Stalled(Exception):
    """The watchdog fired: the engine call ran far past its predicted time."""


@dataclass(eq=False)
class TeacherRun:
    """A teacher batch in progress: its jobs, their z after `done` of the lane's steps."""

    lane: Lane
    jobs: list[Job]
    z: torch.Tensor
    labels: torch.Tensor
    done: int = 0

    @property
    def rows(self) -> int:
        return sum(job.n for job in self.jobs)

    @property
    def engine(self):
        return self.jobs[0].engine  # a batch only ever joins jobs of one engine

    @property
    def due(self) -> float:
        return min(job.due for job in self.jobs)

    def remaining_s(self, default_image_step_s: float) -> float:
        left = (self.lane.steps - self.done) / self.lane.steps
        return self.lane.cost_s(self.rows, default_image_step_s) * left

    def prune(self, now: float) -> list[Job]:
        """Drop abandoned jobs and those past their deadline (returned, to be answered)."""
        keep, late, rows = [], [], []
        offset = 0
        for job in self.jobs:
            if job.state == "abandoned" or job.future.done():
                pass
            elif now >= job.deadline:
                late.append(job)
            else:
                keep.append(job)
                rows.extend(range(offset, offset + job.n))
            offset += job.n
        if len(keep) < len(self.jobs):
            index = torch.tensor(rows, dtype=torch.int64)
            self.z, self.labels, self.jobs = self.z[index], self.labels[index], keep
        return late


def padded_rows(engine, model: str, rows: int, max_batch: int) -> int:
    """Rows the engine adds to a batch of `rows` images (split into max_batch chunks)."""
    rows_for = getattr(engine, "rows_for", None)
    if rows_for is None:
        return 0
    added = 0
    for i in range(0, rows, max_batch):
        chunk = min(max_batch, rows - i)
        try:
            added += rows_for(model, chunk) - chunk
        except Exception:  # the engine's own run reports a bad batch size
            return 0
    return added


async def guarded(b: Batcher, lane: Lane, predicted: float, fn, *args):
    """fn(*args) in the engine thread; Stalled (and the batcher failed) past the watchdog."""
    limit = b.watchdog_limit_s(predicted)
    started = time.monotonic()
    b._running_until = started + predicted
    call = b._engine.submit(fn, *args)
    try:
        return await run_limited(call, limit)
    except asyncio.TimeoutError:
        ran = time.monotonic() - getattr(call, "began", started)
        reason = (f"engine stalled: a {lane.label} batch ran {ran:.1f} s, "
                  f"over {b.watchdog_factor:g} x its expected {predicted:.3f} s "
                  f"(limit {limit:.1f} s)")
        b.fail_scheduler(reason)
        raise Stalled(reason) from None
    finally:
        b._running_until = 0.0
        _busy(b, time.monotonic() - started)


def _record(b: Batcher, lane: Lane, rows: int, run_s: float, predicted: float,
            steps: int | None = None) -> None:
    m = b.metrics
    m.batch_duration.observe(run_s)
    m.batch_predicted.labels(lane.bundle, lane.label).set(predicted)
    m.batch_actual.labels(lane.bundle, lane.label).set(run_s)
    lane.observe(rows, run_s, steps)


def begin_batch(b: Batcher, lane: Lane, batch: list[Job], images: int) -> tuple[float, float]:
    """A whole batch starts now: its jobs' queue waits, its size and padding go to the metrics.
    Returns (started, predicted engine seconds)."""
    m = b.metrics
    started = time.monotonic()
    for job in batch:
        m.queue_wait.observe(started - job.enqueued)
        job.started = started
    m.batch_size.observe(images)
    added = padded_rows(batch[0].engine, lane.model, images, b.max_batch)
    m.padded_rows.labels(lane.bundle, lane.label).inc(added)
    return started, lane.cost_s(images, b._default_image_step_s())


def whole(parts: list, noise: torch.Tensor) -> torch.Tensor:
    """The images of a batch run in max_batch chunks; BatchFailed unless one per input."""
    out = torch.cat(parts) if parts else noise[:0]
    if not isinstance(out, torch.Tensor) or out.shape[0] != noise.shape[0]:
        got = out.shape[0] if isinstance(out, torch.Tensor) else type(out).__name__
        raise BatchFailed(f"engine returned {got} images for {noise.shape[0]} inputs")
    return out


async def execute(b: Batcher, lane: Lane, batch: list[Job], images: int) -> None:
    """Run `batch` (images in all) of `lane` whole and answer each of its jobs."""
    _, model, steps = lane.key
    engine = batch[0].engine
    started, predicted = begin_batch(b, lane, batch, images)
    noise = torch.cat([job.noise for job in batch])
    labels = torch.cat([job.labels for job in batch])
    b.running = batch
    try:
        out = await guarded(b, lane, predicted, b._run, engine, model, steps, noise,
                            labels)
    except Stalled as exc:
        _fail_all(b, batch, Unhealthy(f"{exc}; this server is restarting, retry elsewhere"))
        return
    except Exception as exc:  # the engine's failure is this batch's, not the server's
        _fail_all(b, batch, BatchFailed(f"{type(exc).__name__}: {exc}"))
        return
    finally:
        b.running = []
    run_s = time.monotonic() - started
    _record(b, lane, images, run_s, predicted)
    _answer(batch, out, started, run_s, images)


async def execute_chunk(b: Batcher, run: TeacherRun) -> None:
    """Advance `run` by one chunk of steps; answer its jobs when it is done."""
    lane, now = run.lane, time.monotonic()
    for job in run.prune(now):
        b._fail(job, DeadlineExceeded(
            f"request ran past its deadline ({job.deadline - job.enqueued:g} s) and was "
            f"stopped after {run.done} of {lane.steps} teacher steps"))
    if not run.jobs:
        b.runs.remove(run)
        return
    start, stop = run.done, min(run.done + b.chunk_for(run), lane.steps)
    rows = run.rows
    if start == 0:
        for job in run.jobs:
            b.metrics.queue_wait.observe(now - job.enqueued)
            job.started = now
        b.metrics.batch_size.observe(rows)
    predicted = run.remaining_s(b._default_image_step_s()) * (stop - start) / (lane.steps - start)
    try:
        run.z = await guarded(b, lane, predicted, run.engine.run_chunk, "teacher", lane.steps,
                              run.z, run.labels, start, stop)
    except Exception as exc:
        b.runs.remove(run)
        failure = (Unhealthy(f"{exc}; this server is restarting, retry elsewhere")
                   if isinstance(exc, Stalled) else BatchFailed(f"{type(exc).__name__}: {exc}"))
        _fail_all(b, run.jobs, failure)
        return
    _record(b, lane, rows, time.monotonic() - now, predicted, stop - start)
    run.done = stop
    if stop == lane.steps:
        b.runs.remove(run)
        started = run.jobs[0].started  # all of a run's jobs started at its first chunk
        _answer(run.jobs, run.z, started, time.monotonic() - started, rows)


def _answer(batch: list[Job], out: torch.Tensor, started: float, run_s: float,
            images: int) -> None:
    offset = 0
    for job in batch:
        part = out[offset: offset + job.n]
        offset += job.n
        if job.state == "abandoned" or job.future.done():
            continue
        job.state = "done"
        job.future.set_result(Result(part, started - job.enqueued, run_s, images))


def _fail_all(b: Batcher, jobs: list[Job], exc: Exception) -> None:
    for job in jobs:
        b._fail(job, exc)


def _busy(b: Batcher, seconds: float) -> None:
    """Count engine busy time; every BUSY_WINDOW_S, set the busy fraction over that window."""
    b.metrics.engine_busy.inc(seconds)
    b._busy_s += seconds
    now = time.monotonic()
    if now - b._busy_since >= BUSY_WINDOW_S:
        b.metrics.engine_busy_fraction.set(min(1.0, b._busy_s / (now - b._busy_since)))
        b._busy_s, b._busy_since = 0.0, now
