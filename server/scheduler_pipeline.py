"""Two batches in flight, for engines that can (`engine.pipelined`, e.g. CudaGraphEngine).

A pipelined batch is launched, not run: the engine thread calls `engine.launch` (one call per
max_batch rows, as `Batcher._run`), which only enqueues the work on the device and returns
PendingBatch(es) at once. A collector task then waits for the images in the collector thread,
splits them per job, answers the jobs and folds the measured time into the lane's estimates and
the metrics. Meanwhile the batch loop forms and launches the next batch, so the device runs
batch k+1 while batch k's images are copied back, collected, split and encoded, and while the
next batch waits for its window.

- Why two: one batch computing while the one before it is being handed back is all the overlap
  there is on one device; a third would only wait on the device queue (the engine keeps two
  buffer sets per graph, and its `SlotRing` would block the third launch anyway) while adding
  its whole run to every new request's wait. So the loop waits for the oldest batch to be
  collected before it launches a third (`MAX_IN_FLIGHT`).
- The collector thread: `PendingBatch.result()` blocks (on a CUDA event), so it runs in one
  daemon thread of its own (`EngineThread`: a hung device never keeps the process from
  exiting, which the default executor's threads would), in launch order, which is the order
  the device finishes them in.
- Timing: a batch's engine time is from its launch, or from the collection of the batch ahead
  of it when it was launched behind one, to its collection: the time the device spent on it,
  not the time it queued behind the batch ahead (which would double the second batch's
  estimate). The same intervals add up to the busy time (never counted twice). Each job's
  `run_s` is its own launch -> collected time.
- Watchdog: launch and collection of a batch share one limit, its own watchdog limit plus the
  predicted rest of the batch ahead of it; past it the scheduler fails as for a whole batch.
- `running` holds the jobs of every batch in flight and `_running_until` the predicted end of
  the last one; a failing collection fails only its own jobs (BatchFailed).
- A synchronous engine call (a non-pipelined engine's batch, a teacher chunk) first waits until
  no batch is in flight (`drain`), so it still has the engine to itself, as before.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .engine_thread import EngineThread, run_limited
from .lanes import Job, Lane
from .outcomes import BatchFailed, Unhealthy
from .scheduler_run import _answer, _busy, _fail_all, _record, begin_batch, whole

if TYPE_CHECKING:
    from .batcher import Batcher

MAX_IN_FLIGHT = 2  # batches launched and not yet collected, at most


def pipelined(engine) -> bool:
    """True for an engine whose `launch` returns before its batch is done."""
    return bool(getattr(engine, "pipelined", False))


@dataclass(eq=False)
class Flight:
    """A launched batch: its jobs and timings, and the task collecting it."""

    lane: Lane
    jobs: list[Job]
    images: int
    started: float
    predicted: float
    until: float  # predicted end, after the batch ahead of it
    deadline: float  # the watchdog: launch and collection must be done by then
    task: asyncio.Task | None = None


class Pipeline:
    """The batches in flight of one Batcher."""

    def __init__(self, b: Batcher) -> None:
        self.b = b
        self.flights: deque[Flight] = deque()
        self._collector: EngineThread | None = None  # started by the first launch
        self._last_done = 0.0  # when the device last finished a batch (its collection)

    @property
    def full(self) -> bool:
        return len(self.flights) >= MAX_IN_FLIGHT

    async def wait_slot(self) -> None:
        """Wait until fewer than MAX_IN_FLIGHT batches are in flight."""
        while self.full:
            await self._wait(self.flights[0])

    async def drain(self) -> None:
        """Wait until no batch is in flight (returns at once, without yielding, when none is)."""
        while self.flights:
            await self._wait(self.flights[-1])

    @staticmethod
    async def _wait(flight: Flight) -> None:
        if flight.task is None:  # still launching: never seen by the loop, which launches
            await asyncio.sleep(0.001)
        else:
            await asyncio.wait({flight.task})  # never raises: the collector answers failures

    async def close(self, timeout_s: float, exc: Exception) -> int:
        """Wait up to timeout_s for the collections in flight, then fail what is left with
        `exc` (usually answered already: by fail_all) and cancel it; stop the collector
        thread. Returns how many requests had to be failed."""
        tasks = {f.task for f in self.flights if f.task is not None}
        pending = set()
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=max(timeout_s, 0.0))
        jobs = [j for f in self.flights for j in f.jobs
                if j.state != "abandoned" and not j.future.done()]
        _fail_all(self.b, jobs, exc)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
        if self._collector is not None:
            self._collector.shutdown()
        return len(jobs)

    # -- launch ----------------------------------------------------------------------------
    async def launch(self, lane: Lane, batch: list[Job], images: int) -> None:
        """Launch `batch` in the engine thread and start its collection; returns once it is
        enqueued on the device (or has failed)."""
        b = self.b
        _, model, steps = lane.key
        engine = batch[0].engine
        started, predicted = begin_batch(b, lane, batch, images)
        ahead = max(0.0, b._running_until - started)  # the rest of the batch in flight
        flight = Flight(lane, batch, images, started, predicted, started + ahead + predicted,
                        started + ahead + b.watchdog_limit_s(predicted))
        self.flights.append(flight)
        self._update()
        noise = torch.cat([job.noise for job in batch])
        labels = torch.cat([job.labels for job in batch])
        call = b._engine.submit(self._launch, engine, model, steps, noise, labels)
        try:  # its limit counts from when the engine thread begins the launch
            pendings = await run_limited(call, flight.deadline - started)
        except asyncio.TimeoutError:
            self._stalled(flight, "launch")
            return
        except asyncio.CancelledError:  # the loop was cancelled (close ran out of time)
            self._done(flight, time.monotonic())
            raise
        except Exception as exc:  # the engine's failure is this batch's, not the server's
            self._done(flight, time.monotonic())
            _fail_all(b, batch, BatchFailed(f"{type(exc).__name__}: {exc}"))
            return
        flight.deadline += max(0.0, getattr(call, "began", started) - started)  # queued time
        if self._collector is None:
            self._collector = EngineThread("halfstep-collector")
        flight.task = asyncio.get_running_loop().create_task(
            self._collect(flight, pendings, noise), name="halfstep-collect")

    def _launch(self, engine, model: str, steps: int, noise: torch.Tensor,
                labels: torch.Tensor) -> list:
        """Engine thread: one launch per max_batch rows."""
        m = self.b.max_batch
        return [engine.launch(model, steps, noise[i: i + m], labels[i: i + m])
                for i in range(0, noise.shape[0], m)]

    # -- collection ------------------------------------------------------------------------
    @staticmethod
    def _gather(pendings: list) -> tuple[list | None, BaseException | None, float]:
        """Collector thread: every part's images (or the failure), and when they were in."""
        try:
            return [p.result() for p in pendings], None, time.monotonic()
        except Exception as exc:
            return None, exc, time.monotonic()

    async def _collect(self, flight: Flight, pendings: list, noise: torch.Tensor) -> None:
        """Wait for the images under the watchdog, answer the jobs, record the timing."""
        b, lane = self.b, flight.lane
        assert self._collector is not None
        future = asyncio.wrap_future(self._collector.submit(self._gather, pendings))
        try:
            try:
                parts, error, done = await asyncio.wait_for(
                    asyncio.shield(future), flight.deadline - time.monotonic())
            except asyncio.TimeoutError:
                self._stalled(flight, "collection")
                return
            engine_s = self._done(flight, done)
            try:
                if error is not None:
                    raise error
                out = whole(parts, noise)
            except Exception as exc:
                _fail_all(b, flight.jobs, BatchFailed(f"{type(exc).__name__}: {exc}"))
                return
            _record(b, lane, flight.images, engine_s, flight.predicted)
            _answer(flight.jobs, out, flight.started, done - flight.started, flight.images)
        finally:
            if flight in self.flights:  # cancelled by close
                self._done(flight, time.monotonic())
            b._slot_free(lane, flight.images)  # its clients come back: expected in its lane
            b._wakeup.set()

    # -- bookkeeping -----------------------------------------------------------------------
    def _done(self, flight: Flight, done: float) -> float:
        """The batch left the engine at `done`: out of flight, its engine time counted busy
        (from its launch or the previous batch's end, whichever is later); returns it."""
        engine_s = max(0.0, done - max(flight.started, self._last_done))
        self._last_done = max(self._last_done, done)
        self.flights.remove(flight)
        self._update()
        _busy(self.b, engine_s)
        return engine_s

    def _stalled(self, flight: Flight, what: str) -> None:
        b, now = self.b, time.monotonic()
        reason = (f"engine stalled: a {flight.lane.label} batch's {what} ran "
                  f"{now - flight.started:.1f} s, over {b.watchdog_factor:g} x its expected "
                  f"{flight.predicted:.3f} s (limit {flight.deadline - flight.started:.1f} s)")
        b.fail_scheduler(reason)
        self._done(flight, now)
        _fail_all(b, flight.jobs, Unhealthy(f"{reason}; this server is restarting, retry "
                                            f"elsewhere"))

    def _update(self) -> None:
        """`running` and `_running_until` from the batches in flight."""
        b = self.b
        b.running = [job for f in self.flights for job in f.jobs]
        b._running_until = max((f.until for f in self.flights), default=0.0)
