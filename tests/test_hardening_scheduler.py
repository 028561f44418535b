"""The hardened scheduler with fake engines: the teacher in chunks with students in between, a
teacher past its deadline or abandoned stopping at a chunk boundary, the watchdog, and the
batch loop ending for any reason."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from halfstep.server.batcher import Batcher, DeadlineExceeded, Unhealthy
from halfstep.server.engine_thread import EngineThread
from halfstep.server.metrics import Metrics

SHAPE = (1, 2, 2)


class ChunkEngine:
    """Sleeps per_step_s per step; the teacher runs in chunks (z + steps run), students whole
    (noise + steps). Records every call as (model, steps, start, stop)."""

    def __init__(self, per_step_s: float = 0.01) -> None:
        self.per = per_step_s
        self.calls: list[tuple[str, int, int, int]] = []
        self.gate = threading.Event()
        self.gate.set()

    def chunkable(self, model: str) -> bool:
        return model == "teacher"

    def run(self, model, steps, noise, labels):
        assert self.gate.wait(30)
        self.calls.append((model, steps, 0, steps))
        time.sleep(self.per * steps)
        return noise + steps

    def run_chunk(self, model, steps, z, labels, start, stop):
        self.calls.append((model, steps, start, stop))
        time.sleep(self.per * (stop - start))
        return z + (stop - start)


def inputs(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.zeros(n, *SHAPE), torch.zeros(n, dtype=torch.int64)


def make(engine, **kw) -> Batcher:
    args = dict(max_batch=8, max_wait_s=0.0, max_queue=64, metrics=Metrics(), wait_fraction=0.0)
    args.update(kw)
    return Batcher({"m": engine}, **args)


def test_teacher_runs_in_chunks_with_students_in_between():
    engine = ChunkEngine(per_step_s=0.005)

    async def scenario():
        b = make(engine, chunk_steps=8)
        b.start()
        teacher = asyncio.create_task(b.submit(("m", "teacher", 64), *inputs(2), 30.0))
        while not engine.calls:
            await asyncio.sleep(0.001)
        students = [await b.submit(("m", "student", 1), *inputs(), 30.0) for _ in range(3)]
        result = await teacher
        await b.close(5)
        return result, students

    result, students = asyncio.run(scenario())
    chunks = [c for c in engine.calls if c[0] == "teacher"]
    assert [(start, stop) for _, _, start, stop in chunks] == [(i, i + 8) for i in range(0, 64, 8)]
    first, last = engine.calls.index(chunks[0]), engine.calls.index(chunks[-1])
    between = [c for c in engine.calls[first:last] if c[0] == "student"]
    assert len(between) == 3  # each student ran between two teacher chunks, not after all 64
    assert torch.equal(result.images, torch.full((2, *SHAPE), 64.0))
    assert all(torch.equal(s.images, torch.ones(1, *SHAPE)) for s in students)


def test_teacher_past_its_deadline_stops_at_the_next_chunk():
    engine = ChunkEngine(per_step_s=0.02)  # 64 steps: 1.3 s; the deadline is 0.3 s

    async def scenario():
        b = make(engine, chunk_steps=4)
        b.start()
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="past its deadline"):
            await b.submit(("m", "teacher", 64), *inputs(), 0.3)
        answered = time.monotonic() - t0
        await asyncio.sleep(0.5)
        idle = b.idle
        await b.close(5)
        return answered, idle

    answered, idle = asyncio.run(scenario())
    assert answered < 0.6  # 504 at the deadline, not after the whole run
    assert idle and len(engine.calls) <= 6  # stopped at a chunk boundary (16 chunks in all)


def test_a_teacher_whose_client_left_is_dropped_at_the_next_chunk():
    engine = ChunkEngine(per_step_s=0.02)

    async def scenario():
        b = make(engine, chunk_steps=4)
        b.start()
        task = asyncio.create_task(b.submit(("m", "teacher", 64), *inputs(), 30.0))
        await asyncio.sleep(0.2)
        task.cancel()
        await asyncio.sleep(0.4)
        calls = len(engine.calls)
        await b.close(5)
        return calls

    assert asyncio.run(scenario()) <= 5


def test_watchdog_fails_a_stalled_batch_and_the_scheduler():
    engine = ChunkEngine(per_step_s=0.001)

    async def scenario():
        b = make(engine, watchdog_factor=10, watchdog_min_s=0.2)
        b.seed_run_times("m", {("student", 1): 0.001})
        b.start()
        engine.gate.clear()  # the next run hangs
        t0 = time.monotonic()
        with pytest.raises(Unhealthy, match="engine stalled"):
            await b.submit(("m", "student", 1), *inputs(), 30.0)
        took = time.monotonic() - t0
        with pytest.raises(Unhealthy):
            await b.submit(("m", "student", 1), *inputs(), 30.0)
        engine.gate.set()
        failure = b.failure
        await b.close(1)
        return took, failure

    took, failure = asyncio.run(scenario())
    assert 0.15 < took < 2
    assert "over 10 x its expected" in failure


def test_watchdog_limit_rule():
    b = make(ChunkEngine(), watchdog_factor=10, timeout_s=30)
    assert b.watchdog_limit_s(0.01) == 5.0  # at least 5 s
    assert b.watchdog_limit_s(2.0) == 20.0
    assert b.watchdog_limit_s(0.0) == 30.0  # nothing measured: the request timeout


class LoopStop(BaseException):
    """Not an Exception: the done-callback must notice it too."""


@pytest.mark.parametrize("error", [RuntimeError("bug in the loop"), LoopStop("stop")])
def test_the_batch_loop_ending_fails_the_scheduler(error):
    engine = ChunkEngine()

    async def scenario():
        b = make(engine)
        b.start()
        await b.submit(("m", "student", 1), *inputs(), 30.0)

        def broken():
            raise error

        b._next_lane = broken
        b._wakeup.set()
        await asyncio.sleep(0.05)
        with pytest.raises(Unhealthy, match="batch loop crashed"):
            await b.submit(("m", "student", 1), *inputs(), 30.0)
        return b.failure

    assert type(error).__name__ in asyncio.run(scenario())


def test_a_cancelled_batch_loop_fails_the_scheduler_but_close_does_not():
    async def scenario():
        b = make(ChunkEngine())
        b.start()
        await asyncio.sleep(0)
        b._task.cancel()
        await asyncio.sleep(0.01)
        cancelled = b.failure
        ok = make(ChunkEngine())
        ok.start()
        await ok.close(1)
        return cancelled, ok.failure

    cancelled, closed = asyncio.run(scenario())
    assert cancelled == "the batch loop was cancelled" and closed is None


def test_the_engine_thread_never_blocks_interpreter_exit():
    worker = EngineThread()
    assert worker.thread.daemon
    assert worker.submit(lambda x: x + 1, 1).result(5) == 2
    worker.shutdown()
    worker.thread.join(5)
    assert not worker.thread.is_alive()


def test_a_batch_queued_behind_a_warm_up_is_not_a_stall():
    """Another bundle's warm-up (or a reload's, on CUDA) runs in the engine thread; a batch
    waiting behind it has not started, so its watchdog does not count that wait."""
    engine = ChunkEngine()

    async def scenario():
        b = make(engine, watchdog_min_s=0.3, watchdog_factor=1.0)
        b.seed_run_times("m", {("student", 1): 0.001})
        b.start()
        warm = asyncio.ensure_future(b.call_in_engine_thread(time.sleep, 1.0))
        await asyncio.sleep(0.05)
        result = await b.submit(("m", "student", 1), *inputs(), 30.0)
        await warm
        failure = b.failure
        await b.close(5)
        return result, failure

    result, failure = asyncio.run(scenario())
    assert result.images.shape[0] == 1 and failure is None
