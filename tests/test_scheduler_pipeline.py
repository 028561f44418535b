"""The scheduler with two batches in flight (pipelined engines), on fake engines whose launch
returns at once and whose batches finish later in a thread: the next batch is launched before
the previous one is collected, never more than two are in flight, every request gets exactly
its own rows, a failing batch fails only its requests, close waits for the batches in flight,
and an engine that does not opt in still runs one batch at a time."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest
import torch

from halfstep.engines.base import Engine
from halfstep.engines.pipeline import PendingBatch
from halfstep.server.batcher import Batcher, BatchFailed, Draining, Unhealthy
from halfstep.server.metrics import Metrics

SHAPE = (1, 2, 2)
BATCH = 1000.0  # batch k adds (k + 1) x BATCH to its rows: every row tells its batch


class PipeEngine:
    """`launch` logs ("launch", k, steps, rows) and returns at once; a thread computes batch k
    (noise + (k + 1) x BATCH) once gate(k) is open and `delay_s` has passed; collecting it
    logs ("collect", k). `run` (used only when `pipelined` is False) logs ("run", k, ...) and
    ("ran", k) around the same computation. Batches in `fail` raise when collected."""

    pipelined = True

    def __init__(self, delay_s: float = 0.01, closed=(), fail=()) -> None:
        self.delay, self.closed, self.fail = delay_s, set(closed), set(fail)
        self.log: list[tuple] = []
        self.lock = threading.Lock()
        self.gates: dict[int, threading.Event] = {}
        self.count = 0
        self.outstanding = self.most_outstanding = 0  # launched, not yet collected
        self.active = self.most_active = 0  # inside run()

    def gate(self, k: int) -> threading.Event:
        with self.lock:
            if k not in self.gates:
                self.gates[k] = threading.Event()
                if k not in self.closed:
                    self.gates[k].set()
            return self.gates[k]

    def open_all(self) -> None:
        self.closed.clear()
        for k in range(self.count + 1):
            self.gate(k).set()

    def _next(self, kind: str, steps: int, rows: int) -> int:
        with self.lock:
            k, self.count = self.count, self.count + 1
            self.log.append((kind, k, steps, rows))
            return k

    def _compute(self, k: int, noise: torch.Tensor) -> torch.Tensor:
        assert self.gate(k).wait(30)
        time.sleep(self.delay)
        return noise + (k + 1) * BATCH

    def launch(self, model, steps, noise, labels) -> PendingBatch:
        k = self._next("launch", steps, int(noise.shape[0]))
        with self.lock:
            self.outstanding += 1
            self.most_outstanding = max(self.most_outstanding, self.outstanding)
        box: dict = {}
        done = threading.Event()

        def compute() -> None:
            box["out"] = self._compute(k, noise)
            done.set()

        threading.Thread(target=compute, daemon=True).start()

        def finish() -> torch.Tensor:
            assert done.wait(30)
            with self.lock:
                self.outstanding -= 1
                self.log.append(("collect", k))
            if k in self.fail:
                raise RuntimeError(f"device error in batch {k}")
            return box["out"]

        return PendingBatch(finish)

    def run(self, model, steps, noise, labels) -> torch.Tensor:
        k = self._next("run", steps, int(noise.shape[0]))
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        out = self._compute(k, noise)
        with self.lock:
            self.active -= 1
            self.log.append(("ran", k))
        return out

    def launched(self) -> list[tuple]:
        return [e for e in self.log if e[0] in ("launch", "run")]


def make(engine, **kw) -> Batcher:
    args = dict(max_batch=8, max_wait_s=0.0, max_queue=512, metrics=Metrics(), wait_fraction=0.0)
    args.update(kw)
    return Batcher({"m": engine}, **args)


def inputs(request: int, n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that tell the request and the row apart: 10 x request + row (exact in float32)."""
    rows = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1) + 10.0 * request
    return rows.expand(n, *SHAPE).contiguous(), torch.zeros(n, dtype=torch.int64)


def batch_of(images: torch.Tensor, noise: torch.Tensor) -> int:
    """The batch k whose rows these are; fails unless they are exactly this request's rows."""
    diff = images - noise
    c = float(diff.flatten()[0])
    assert torch.all(diff == c), "rows of another request"
    assert c > 0 and c % BATCH == 0, c
    return int(c // BATCH) - 1


async def answered(*tasks):
    """The tasks' results, or a failure (never a hang) when a request is left unanswered."""
    return await asyncio.wait_for(asyncio.gather(*tasks), 10)


async def until(predicate, timeout_s: float = 5.0) -> None:
    end = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.002)


S1, S2, S4 = ("m", "student", 1), ("m", "student", 2), ("m", "student", 4)


def test_the_next_batch_is_launched_before_the_first_is_collected():
    engine = PipeEngine(closed={0})

    async def scenario():
        b = make(engine)
        b.start()
        a = asyncio.create_task(b.submit(S1, *inputs(1), timeout_s=10))
        c = asyncio.create_task(b.submit(S2, *inputs(2), timeout_s=10))
        await until(lambda: len(engine.launched()) == 2)  # batch 0 cannot finish yet
        log = list(engine.log)
        in_flight = (len(b.running), b._running_until > 0, b.idle)
        engine.open_all()
        ra, rc = await answered(a, c)
        await b.close(5)
        return log, in_flight, ra, rc, b

    log, in_flight, ra, rc, b = asyncio.run(scenario())
    assert [e[0] for e in log] == ["launch", "launch"]  # nothing collected in between
    assert in_flight == (2, True, False)
    assert {batch_of(ra.images, inputs(1)[0]), batch_of(rc.images, inputs(2)[0])} == {0, 1}
    assert b.idle and not b.running and b._running_until == 0.0
    assert b.lane(S1).batch_s is not None and b.lane(S2).batch_s is not None  # estimates fed


def test_never_more_than_two_batches_in_flight():
    engine = PipeEngine(delay_s=0.01)

    async def scenario():
        b = make(engine)
        b.start()
        keys = [S1, S2, S4]
        results = await answered(*[
            b.submit(keys[i % 3], *inputs(i, 1 + i % 3), timeout_s=20) for i in range(60)])
        await b.close(5)
        return results

    results = asyncio.run(scenario())
    assert len(results) == 60
    assert engine.most_outstanding == 2  # it did overlap, and never by more
    order = {(e[0], e[1]): i for i, e in enumerate(engine.log)}
    for k in range(2, engine.count):  # a third launch waits for the oldest collection
        assert order[("collect", k - 2)] < order[("launch", k)], k


def test_every_request_gets_exactly_its_rows():
    engine = PipeEngine(delay_s=0.002)
    rng = random.Random(0)
    keys = [S1, S2, S4]
    plan = [(keys[rng.randrange(3)], rng.randint(1, 5)) for _ in range(150)]

    async def scenario():
        b = make(engine, wait_fraction=1.0, max_wait_s=0.005)
        b.start()
        (big,) = await answered(b.submit(S2, *inputs(999, 11), timeout_s=20))  # 8 + 3 rows

        async def client(i: int):
            await asyncio.sleep(rng.random() * 0.05)
            return await b.submit(plan[i][0], *inputs(i, plan[i][1]), timeout_s=20)

        results = await answered(*[client(i) for i in range(len(plan))])
        busy = b.metrics.registry.get_sample_value("halfstep_engine_busy_seconds_total")
        await b.close(5)
        return big, results, busy

    big, results, busy = asyncio.run(scenario())
    noise = inputs(999, 11)[0]
    assert batch_of(big.images[:8], noise[:8]) + 1 == batch_of(big.images[8:], noise[8:])
    launches = {e[1]: (e[2], e[3]) for e in engine.log if e[0] == "launch"}
    rows: dict[int, int] = {}
    for i, ((_, _, steps), n) in enumerate(plan):
        result = results[i]
        assert result.images.shape == (n, *SHAPE)
        k = batch_of(result.images, inputs(i, n)[0])
        assert launches[k][0] == steps  # its own lane's batch
        assert result.batch_images == launches[k][1]
        rows[k] = rows.get(k, 0) + n
    assert all(rows[k] == launches[k][1] for k in rows)  # no batch held anyone else's rows
    assert len(rows) < len(plan) and busy > 0  # requests were batched; busy time counted


def test_a_failing_batch_fails_only_its_requests():
    engine = PipeEngine(closed={0}, fail={1})

    async def scenario():
        b = make(engine)
        b.start()
        a = asyncio.create_task(b.submit(S1, *inputs(1), timeout_s=10))
        await until(lambda: len(engine.launched()) == 1)
        bad = asyncio.create_task(b.submit(S1, *inputs(2), timeout_s=10))
        await until(lambda: len(engine.launched()) == 2)
        c = asyncio.create_task(b.submit(S1, *inputs(3), timeout_s=10))  # waits for a slot
        await asyncio.sleep(0.05)
        assert len(engine.launched()) == 2
        engine.open_all()
        with pytest.raises(BatchFailed, match="device error in batch 1"):
            await answered(bad)
        ra, rc = await answered(a, c)
        (later,) = await answered(b.submit(S1, *inputs(4), timeout_s=10))
        failure = b.failure
        await b.close(5)
        return ra, rc, later, failure

    ra, rc, later, failure = asyncio.run(scenario())
    assert failure is None
    assert batch_of(ra.images, inputs(1)[0]) == 0 and batch_of(rc.images, inputs(3)[0]) == 2
    assert batch_of(later.images, inputs(4)[0]) == 3


def test_a_stalled_collection_fails_the_scheduler():
    engine = PipeEngine(closed={0})

    async def scenario():
        b = make(engine, watchdog_factor=10, watchdog_min_s=0.2)
        b.seed_run_times("m", {("student", 1): 0.001})
        b.start()
        t0 = time.monotonic()
        with pytest.raises(Unhealthy, match="engine stalled"):
            await answered(b.submit(S1, *inputs(1), timeout_s=10))
        took = time.monotonic() - t0
        with pytest.raises(Unhealthy):
            await answered(b.submit(S1, *inputs(2), timeout_s=10))
        engine.open_all()
        failure = b.failure
        await b.close(1)
        return took, failure

    took, failure = asyncio.run(scenario())
    assert 0.15 < took < 2
    assert "collection" in failure and "over 10 x its expected" in failure


def test_close_waits_for_the_batches_in_flight():
    engine = PipeEngine(closed={0, 1})

    async def scenario():
        b = make(engine)
        b.start()
        a = asyncio.create_task(b.submit(S1, *inputs(1), timeout_s=10))
        c = asyncio.create_task(b.submit(S2, *inputs(2), timeout_s=10))
        await until(lambda: len(engine.launched()) == 2)
        closing = asyncio.create_task(b.close(5))
        await asyncio.sleep(0.1)
        waited = not closing.done() and not a.done() and not c.done()
        engine.open_all()
        failed = await asyncio.wait_for(closing, 10)
        return waited, failed, a.result(), c.result(), b.idle

    waited, failed, ra, rc, idle = asyncio.run(scenario())
    assert waited and failed == 0 and idle
    assert {batch_of(ra.images, inputs(1)[0]), batch_of(rc.images, inputs(2)[0])} == {0, 1}
    assert ("collect", 0) in engine.log and ("collect", 1) in engine.log


def test_close_out_of_time_fails_the_batches_in_flight():
    engine = PipeEngine(closed={0})

    async def scenario():
        b = make(engine)
        b.start()
        a = asyncio.create_task(b.submit(S1, *inputs(1), timeout_s=10))
        await until(lambda: len(engine.launched()) == 1)
        t0 = time.monotonic()
        failed = await b.close(0.2)
        took = time.monotonic() - t0
        with pytest.raises(Draining):
            await answered(a)
        engine.open_all()
        return failed, took

    failed, took = asyncio.run(scenario())
    assert failed == 1 and took < 2


def test_an_engine_that_does_not_opt_in_runs_one_batch_at_a_time():
    engine = PipeEngine(closed={0})
    engine.pipelined = False

    async def scenario():
        b = make(engine)
        b.start()
        a = asyncio.create_task(b.submit(S1, *inputs(1), timeout_s=10))
        c = asyncio.create_task(b.submit(S2, *inputs(2), timeout_s=10))
        await until(lambda: len(engine.launched()) == 1)
        await asyncio.sleep(0.1)
        alone = len(engine.launched()) == 1
        engine.open_all()
        ra, rc = await answered(a, c)
        await b.close(5)
        return alone, ra, rc

    alone, ra, rc = asyncio.run(scenario())
    assert alone and engine.most_active == 1
    assert [e[0] for e in engine.log] == ["run", "ran", "run", "ran"]  # launch never called
    assert {batch_of(ra.images, inputs(1)[0]), batch_of(rc.images, inputs(2)[0])} == {0, 1}


class SyncEngine(Engine):
    """A real Engine (the base launch: runs at once, hands back a finished PendingBatch)."""

    name = "fake"
    pipelined = True

    def _run(self, model, steps, noise, labels):
        return noise * 2


def test_the_default_launch_of_an_engine_serves_through_the_pipeline(tiny_bundle):
    engine = SyncEngine(tiny_bundle, buckets=(1, 2, 4, 8))

    async def scenario():
        b = make(engine)
        b.start()
        noises = [torch.randn(n, *tiny_bundle.image_shape) for n in (1, 3, 4, 2)]
        results = await answered(*[
            b.submit(S2, x, torch.zeros(x.shape[0], dtype=torch.int64), timeout_s=10)
            for x in noises])
        await b.close(5)
        return noises, results

    noises, results = asyncio.run(scenario())
    for x, r in zip(noises, results):
        assert torch.equal(r.images, x * 2)
