"""Scheduler: lanes -> earliest-deadline-first batch choice -> one engine thread.

    /generate -> lanes (mnist,student,1) (mnist,student,4) (mnist,teacher,64) (other,...) ...
    -> engine free: the lane with the soonest `due`, after its window, runs <= max_batch images
    in the engine thread, on the engine its jobs were admitted for

- Lanes: one per (bundle, model, steps) (`lanes.py`), each with its cost per image-step. All
  bundles share the one engine thread (one device), so the earliest-deadline choice spans them.
- Engines: `engines` maps each bundle name to its current engine; a request is bound to that
  engine when admitted, so a reload that swaps the entry (`set_engine`) leaves queued and running
  requests on the old engine.
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
- The teacher runs in chunks of up to `chunk_steps` steps where the engine can (fewer when a
  large teacher batch would hold the engine over `chunk_budget_s` per turn; `TeacherRun`,
  `scheduler_run.py`); after a chunk, queued lanes go before the next chunk, and a teacher
  request past its deadline (or whose client left) stops at the next chunk boundary.
- Engines that can (`engine.pipelined`: CudaGraphEngine) keep up to two batches in flight:
  the engine thread only launches a batch, a collector task answers it, and "engine free" for
  the window is "a launch slot is free" (`scheduler_pipeline.py`). Other engines, and teacher
  chunks, run one call at a time as above (after the batches in flight are collected).
- A stalled batch (watchdog), or the batch loop ending for any reason, marks the scheduler
  failed (`failure`): its requests get 503, /healthz answers 503 and the pod restarts.
"""

from __future__ import annotations

import asyncio
import time

import torch

from .engine_thread import EngineThread
from .estimates import DUE_SLACK, Estimates  # noqa: F401  (DUE_SLACK re-exported)
from .health import Health
from .lanes import Job, Lane, LaneKey
from .metrics import Metrics
from .outcomes import (  # noqa: F401  (re-exported: the scheduler's outcomes)
    BatchFailed,
    DeadlineExceeded,
    Draining,
    NotReady,
    Overloaded,
    QueueFull,
    Result,
    Unhealthy,
)
from .scheduler_pipeline import Pipeline, pipelined
from .scheduler_run import TeacherRun, execute, execute_chunk, whole

CHUNK_STEPS = 8  # most teacher steps per turn of the engine
CHUNK_BUDGET_S = 0.1  # ... and fewer when those take longer than this (at least one step)
WATCHDOG_FACTOR = 10.0  # a batch over this many times its predicted time has stalled
WATCHDOG_MIN_S = 5.0  # ... and over at least this long


class Batcher(Estimates, Health):
    def __init__(self, engines: dict, max_batch: int, max_wait_s: float, max_queue: int,
                 metrics: Metrics, wait_fraction: float = 0.1, *,
                 chunk_steps: int = CHUNK_STEPS, chunk_budget_s: float = CHUNK_BUDGET_S,
                 watchdog_factor: float = WATCHDOG_FACTOR,
                 watchdog_min_s: float = WATCHDOG_MIN_S, timeout_s: float = 30.0) -> None:
        self.engines = dict(engines)  # bundle name -> the engine new requests are bound to
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_wait_s, self.wait_fraction, self.metrics = max_wait_s, wait_fraction, metrics
        self.lanes: dict[LaneKey, Lane] = {}
        self._wakeup = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task | None = None
        self._engine = EngineThread()
        self.chunk_steps, self.watchdog_factor = chunk_steps, watchdog_factor
        self.chunk_budget_s = chunk_budget_s
        self.watchdog_min_s, self.timeout_s = watchdog_min_s, timeout_s
        self.runs: list[TeacherRun] = []  # teacher batches in progress (chunked)
        self.running: list[Job] = []  # the jobs of the whole batch(es) in the engine now
        self._pipe = Pipeline(self)  # pipelined engines: batches in flight
        self.failure: str | None = None  # set when the scheduler can no longer serve
        self._last_chunk = False
        self._free_at, self._running_until = 0.0, 0.0  # last engine-free; running batch's end
        self._expected: dict[LaneKey, int] = {}  # rows each lane expects (window)
        self._busy_s, self._busy_since = 0.0, time.monotonic()
        self._ratios = self.new_ratios()  # deadline_ms calibration (Estimates.deadline_slack)

    # -- lifecycle ------------------------------------------------------------------------
    def set_engine(self, bundle: str, engine) -> None:
        """Bind requests of `bundle` admitted from now on to `engine` (a reload's swap)."""
        self.engines[bundle] = engine

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="halfstep-batcher")
        self._task.add_done_callback(self._loop_ended)

    async def call_in_engine_thread(self, fn, *args):
        """Run fn in the engine thread (warm-up shares the thread so it never races a batch)."""
        return await asyncio.wrap_future(self._engine.submit(fn, *args))

    def begin_drain(self) -> None:
        """Refuse new work from now on (Draining); accepted work still runs."""
        self._closing = True
        self._wakeup.set()

    @property
    def idle(self) -> bool:
        """Nothing queued, running or part-run."""
        return (not self.depth and not self.runs and not self._pipe.flights
                and self._running_until == 0.0)

    async def close(self, drain_s: float) -> int:
        """Stop accepting, finish queued and running batches (those in flight included) for up
        to drain_s; returns how many requests had to be failed because the drain ran out of
        time."""
        self.begin_drain()
        failed, end = 0, time.monotonic() + max(drain_s, 0.0)
        if self._task is not None and not self._task.done():
            try:
                await asyncio.wait_for(asyncio.shield(self._task), max(drain_s, 0.0))
            except asyncio.TimeoutError:
                failed = self.fail_all(Draining("server shut down before this request was done"))
                self._task.cancel()
        failed += await self._pipe.close(end - time.monotonic(), Draining(
            "server shut down before this request was done"))
        self._engine.shutdown()
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

    # -- requests -------------------------------------------------------------------------
    async def submit(self, key: LaneKey, noise: torch.Tensor, labels: torch.Tensor,
                     timeout_s: float, *, deadline_s: float | None = None,
                     max_backlog_s: float = 0.0, engine=None) -> Result:
        """Queue one request of lane `key` = (bundle, model, steps) and wait for its images.
        deadline_s: it must be done by then (refused at once if predicted not to be);
        max_backlog_s > 0 bounds queued work; engine: the one it was checked against (default:
        the bundle's current engine)."""
        if self.failure is not None:
            raise Unhealthy(f"{self.failure}; this server is restarting, retry elsewhere")
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
        predicted = self.predicted_at(key, n, due, cost)
        if deadline_s is not None and predicted > deadline_s:
            raise Overloaded(f"predicted completion {predicted * 1e3:.1f} ms misses the "
                             f"deadline {deadline_s * 1e3:.0f} ms", predicted - deadline_s)
        limit = timeout_s if deadline_s is None else min(timeout_s, deadline_s)
        engine = engine or self.engines[key[0]]
        job = Job(key, engine, noise, labels, now, now + limit, due, cost,
                  asyncio.get_running_loop().create_future(),
                  chunked=self._chunked(key, engine), firm=deadline_s is not None)
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
            if job.chunked and job.state == "running":  # stops at its next chunk boundary
                job.state = "abandoned"
                raise DeadlineExceeded(f"request ran past its deadline ({limit:g} s); its "
                                       f"teacher run was stopped") from None
            result = await job.future  # a whole (student) batch: short, the watchdog bounds it
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
            m.lane_queue_depth.labels(lane.bundle, lane.label).set(len(lane.queue))
            m.lane_backlog.labels(lane.bundle, lane.label).set(lane.backlog_s)

    # -- the batch loop -------------------------------------------------------------------
    def _chunked(self, key: LaneKey, engine) -> bool:
        """A teacher of more than chunk_steps steps, on an engine that can: run in chunks."""
        _, model, steps = key
        chunkable = getattr(engine, "chunkable", None)
        return model == "teacher" and 0 < self.chunk_steps < steps and bool(
            chunkable and chunkable("teacher"))

    def chunk_for(self, run: TeacherRun) -> int:
        """Teacher steps of `run`'s next turn: chunk_steps, fewer when that would hold the
        engine over chunk_budget_s (a large teacher batch), at least one."""
        per_step = run.rows * (run.lane.image_step_s or self._default_image_step_s())
        fits = int(self.chunk_budget_s / per_step) if per_step > 0 else self.chunk_steps
        return max(1, min(self.chunk_steps, fits))

    def _next_lane(self) -> Lane | TeacherRun | None:
        """Earliest deadline first: the lane holding the queued job with the soonest due, or a
        teacher run in progress (right after one of its chunks, queued lanes go first)."""
        busy = [(min(j.due for j in lane.queue), lane) for lane in self.lanes.values()
                if lane.queue]
        if not (self._last_chunk and busy):
            busy += [(run.due, run) for run in self.runs]
        return min(busy, key=lambda pair: pair[0], default=(0.0, None))[1]

    async def _loop(self) -> None:
        try:
            await self._batches()
        except asyncio.CancelledError:
            if not self._closing:
                self.fail_scheduler("the batch loop was cancelled")
            raise
        except BaseException as exc:  # noted before the done-callback sees it
            self.fail_scheduler(f"the batch loop crashed: {type(exc).__name__}: {exc}")
            raise

    async def _batches(self) -> None:
        while self.failure is None:
            if self._pipe.full:  # MAX_IN_FLIGHT batches launched: wait for the oldest
                await self._pipe.wait_slot()
                continue
            lane = self._next_lane()
            if isinstance(lane, TeacherRun):
                if self._pipe.flights:  # a synchronous call has the engine to itself
                    await self._pipe.drain()
                    continue
                self._last_chunk = True
                await execute_chunk(self, lane)
                self._free_at = time.monotonic()
                continue
            if lane is None:
                if self._closing:
                    await self._pipe.drain()  # close waits for the batches in flight
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
            firm = [j.due for j in lane.queue if j.firm]  # a job with its own deadline_ms:
            if firm:  # wait for company only while the batch it would make (x2, a margin for
                # the estimate) still finishes in time
                full = lane.cost_s(expected, self._default_image_step_s())
                end = min(end, min(firm) - 2 * full)
            wait = end - time.monotonic()
            if rows < expected and wait > 0 and not self._closing and not self.runs:
                self._wakeup.clear()  # woken early by a new request, a drop, or close()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), wait)
                except asyncio.TimeoutError:
                    pass
                continue
            head = lane.queue[0]  # take() starts from it: its engine runs the batch
            if self._pipe.flights and (head.chunked or not pipelined(head.engine)):
                await self._pipe.drain()  # a synchronous call has the engine to itself
                continue
            batch, images = lane.take(self.max_batch)
            for job in batch:
                lane.queue.remove(job)
                job.state = "running"
            self._gauges()
            self._last_chunk = False
            if batch[0].chunked:  # its first chunk runs at once (it is due first)
                run = TeacherRun(lane, batch, torch.cat([j.noise for j in batch]),
                                 torch.cat([j.labels for j in batch]))
                self.runs.append(run)
                self._last_chunk = True
                await execute_chunk(self, run)
            elif pipelined(batch[0].engine):  # launched; collected by its own task
                await self._pipe.launch(lane, batch, images)
                self._slot_free(lane, launched=True)
                continue
            else:
                await execute(self, lane, batch, images)
            self._free_at = time.monotonic()
            # closed-loop clients of this batch come back: expect them with what is queued
            self._expected = {k: other.rows + (images if other is lane else 0)
                              for k, other in self.lanes.items()}

    def _run(self, engine, model: str, steps: int, noise: torch.Tensor,
             labels: torch.Tensor) -> torch.Tensor:
        """Engine thread: one engine call per max_batch rows, then the output-count check."""
        m = self.max_batch
        return whole([engine.run(model, steps, noise[i: i + m], labels[i: i + m])
                      for i in range(0, noise.shape[0], m)], noise)

    def _slot_free(self, lane: Lane, images: int = 0, launched: bool = False) -> None:
        """Pipelined engines: a launch slot is free, which is "engine free" for the window. A
        launch takes its lane's expected rows (left: what is still queued); a collection adds
        its images to its lane's (its closed-loop clients come back)."""
        self._free_at = time.monotonic()
        e, key = self._expected, lane.key
        e[key] = lane.rows if launched else max(e.get(key, 0), lane.rows) + images
