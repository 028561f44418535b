"""The scheduler with fake engines of controlled timing (no model): engine-free batch formation,
no padding on batch-invariant backends, earliest deadline first across lanes, admission by
cost and deadline_ms choosing the student."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from halfstep.engines.base import Engine
from halfstep.server.batcher import Batcher, Overloaded
from halfstep.server.metrics import Metrics
from halfstep.server.routes import choose_student

SHAPE = (1, 2, 2)


class FakeEngine:
    """Sleeps `per_image_step_s` x rows x steps per batch; records (model, steps, rows)."""

    def __init__(self, per_image_step_s: float = 0.001, fixed_s: float = 0.0) -> None:
        self.per, self.fixed = per_image_step_s, fixed_s
        self.calls: list[tuple[str, int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def run(self, model, steps, noise, labels):
        self.entered.set()
        assert self.gate.wait(30)
        self.calls.append((model, steps, int(noise.shape[0])))
        time.sleep(self.fixed + self.per * steps * noise.shape[0])
        return noise.clone()


def noise(n: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, *SHAPE), torch.zeros(n, dtype=torch.int64)


def make(engine, **kw) -> Batcher:
    args = dict(max_batch=64, max_wait_s=0.05, max_queue=256, metrics=Metrics(),
                wait_fraction=1.0)
    args.update(kw)
    return Batcher({"m": engine}, **args)


def test_returning_clients_merge_into_one_batch():
    """Closed-loop clients that start half a batch apart used to alternate in two half
    batches (the window ran from the oldest arrival); batches now form at engine-free and
    wait for the clients of the batch that just finished."""
    engine = FakeEngine(per_image_step_s=0.0005, fixed_s=0.02)

    async def scenario():
        b = make(engine)
        b.start()

        async def client(delay: float):
            await asyncio.sleep(delay)
            for _ in range(8):
                await b.submit(("m", "student", 4), *noise(), timeout_s=10)
                await asyncio.sleep(0.001)  # encode + the next request on its way back

        await asyncio.gather(*[client(0.0 if i < 8 else 0.01) for i in range(16)])
        await b.close(5)

    asyncio.run(scenario())
    rows = [r for _, _, r in engine.calls]
    assert sum(rows) == 16 * 8
    # after the first half batch, every batch holds all 16 clients (the early half finishes
    # its 8 requests one batch before the late half)
    assert rows[1:-1] == [16] * (len(rows) - 2) and len(rows) <= 10, rows


class InvariantEngine(Engine):
    name = "fake"

    def _run(self, model, steps, noise, labels):
        return noise.clone()


def test_batch_invariant_backends_run_exactly_n_rows(tiny_bundle):
    dynamic = InvariantEngine(tiny_bundle, buckets=(1, 2, 4, 8, 16, 32, 64))
    dynamic.batch_invariant = True
    padded = InvariantEngine(tiny_bundle, buckets=(1, 2, 4, 8, 16, 32, 64))
    assert [dynamic.bucket_for(n) for n in (1, 3, 17, 33)] == [1, 3, 17, 33]
    assert [padded.bucket_for(n) for n in (1, 3, 17, 33)] == [1, 4, 32, 64]
    dynamic.min_rows = 4  # a backend that needs a floor still gets it
    assert dynamic.bucket_for(1) == 4 and dynamic.bucket_for(17) == 17
    with pytest.raises(Exception, match="exceeds the largest bucket"):
        dynamic.bucket_for(65)


def test_padded_rows_are_counted_per_lane(tiny_bundle):
    from halfstep.server.scheduler_run import padded_rows

    bucketed = InvariantEngine(tiny_bundle, buckets=(1, 2, 4, 8, 16, 32, 64))
    assert padded_rows(bucketed, "student", 17, 64) == 15
    bucketed.batch_invariant = True
    assert padded_rows(bucketed, "student", 17, 64) == 0


def test_earliest_deadline_first_between_lanes():
    """A 1-step request that arrives just after a 16-step one runs first: it is due sooner."""
    engine = FakeEngine(per_image_step_s=0.01)

    async def scenario():
        b = make(engine, wait_fraction=0.0)
        b.seed_run_times("m", {("student", 1): 0.01, ("student", 16): 0.16, ("student", 2): 0.02})
        b.start()
        engine.gate.clear()
        blocker = asyncio.create_task(b.submit(("m", "student", 2), *noise(), timeout_s=10))
        assert await asyncio.to_thread(engine.entered.wait, 10)
        slow = asyncio.create_task(b.submit(("m", "student", 16), *noise(), timeout_s=10))
        await asyncio.sleep(0.01)
        fast = asyncio.create_task(b.submit(("m", "student", 1), *noise(), timeout_s=10))
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(blocker, slow, fast)
        await b.close(5)

    asyncio.run(scenario())
    assert [s for _, s, _ in engine.calls] == [2, 1, 16]


def test_admission_by_cost_refuses_with_retry_after():
    engine = FakeEngine(per_image_step_s=0.1)

    async def scenario():
        b = make(engine)
        b.seed_run_times("m", {("student", 4): 0.4})  # 0.1 s per image-step
        b.start()
        engine.gate.clear()
        first = asyncio.create_task(b.submit(("m", "student", 4), *noise(2), timeout_s=30,
                                             max_backlog_s=2.0))
        await asyncio.sleep(0.01)
        assert b.backlog_s() == pytest.approx(0.8, abs=0.01) or engine.entered.is_set()
        with pytest.raises(Overloaded) as err:  # 0.8 queued or running + 1.6 > 2.0
            await b.submit(("m", "student", 4), *noise(4), timeout_s=30, max_backlog_s=2.0)
        ok = asyncio.create_task(b.submit(("m", "student", 4), *noise(1), timeout_s=30,
                                          max_backlog_s=2.0))  # 0.8 + 0.4 fits
        await asyncio.sleep(0.01)
        engine.gate.set()
        await asyncio.gather(first, ok)
        unbounded = await b.submit(("m", "student", 4), *noise(8), timeout_s=30)
        await b.close(5)
        return err.value, unbounded

    err, unbounded = asyncio.run(scenario())
    assert err.retry_after_s == 1 and "over the bound" in str(err)
    assert unbounded.images.shape[0] == 8


def test_deadline_picks_the_largest_student_that_fits_as_the_backlog_grows():
    engine = FakeEngine(per_image_step_s=0.1)  # 100 ms per image-step

    async def scenario():
        b = make(engine)
        b.seed_run_times("m", {("student", s): 0.1 * s for s in (1, 2, 4, 8)})
        state = SimpleNamespace(batcher=b)
        d = SimpleNamespace(name="m", bundle=SimpleNamespace(student_steps=[1, 2, 4, 8]))
        job = SimpleNamespace(steps=8, n=1, exact=False)
        chosen = [choose_student(state, d, job, 1.0)]  # idle: 8 steps = 0.8 s fits 1 s
        b.start()
        engine.gate.clear()
        held = [asyncio.create_task(b.submit(("m", "student", 1), *noise(5), timeout_s=10))]
        await asyncio.sleep(0.01)  # 0.5 s running ahead: 8 steps no longer fit
        chosen.append(choose_student(state, d, job, 1.0))
        held.append(asyncio.create_task(b.submit(("m", "student", 2), *noise(4), timeout_s=10)))
        await asyncio.sleep(0.01)  # + 0.8 s queued, due before a 1 s deadline
        with pytest.raises(Overloaded):
            choose_student(state, d, job, 1.0)
        engine.gate.set()
        await asyncio.gather(*held)
        await b.close(5)
        return chosen

    assert asyncio.run(scenario()) == [8, 4]


def test_a_deadline_prediction_counts_the_lane_jobs_that_share_its_batch():
    """A deadline job is due before the plain jobs queued in its lane, but the lane's batch takes
    them in arrival order: its predicted completion includes them (up to max_batch rows)."""
    engine = FakeEngine(per_image_step_s=0.01)

    async def scenario():
        b = make(engine, max_batch=6)
        b.seed_run_times("m", {("student", 4): 0.04, ("student", 1): 0.01})
        b.start()
        engine.gate.clear()
        blocker = asyncio.create_task(b.submit(("m", "student", 1), *noise(), timeout_s=10))
        await asyncio.sleep(0.05)  # running, held at the gate
        # The plain jobs are due 4 batch times (0.16 s) after they arrive; the predictions come
        # 0.05 s after that with a 0.02 s deadline, so they stay due first even when a loaded
        # machine delays the event loop by tens of milliseconds (with 0.1 s the margin was 10 ms).
        alone = b.predict_s(("m", "student", 4), 1, deadline_s=0.02)
        plain = [asyncio.create_task(b.submit(("m", "student", 4), *noise(2), timeout_s=10))
                 for _ in range(4)]
        await asyncio.sleep(0.05)
        crowded = b.predict_s(("m", "student", 4), 1, deadline_s=0.02)
        other_lane = b.predict_s(("m", "student", 1), 1, deadline_s=0.02)
        engine.gate.set()
        await asyncio.gather(blocker, *plain)
        await b.close(5)
        return alone, crowded, other_lane

    alone, crowded, other_lane = asyncio.run(scenario())
    per_image = 0.01 * 4  # seconds per image at 4 steps (seeded)
    # two of the four plain jobs (2 rows each) fit in a 6-row batch beside the new image
    assert crowded - alone == pytest.approx(4 * per_image, rel=0.2)
    assert other_lane < alone  # an empty lane: only the running batch and its own image


def test_the_window_never_holds_a_deadline_job_past_its_deadline():
    """A lane expecting its 4 clients back waits up to a long window for them, but not a job
    with its own deadline: that one runs while its batch can still finish in time."""
    engine = FakeEngine(per_image_step_s=0.001)

    async def scenario(deadline_s):
        b = make(engine, max_wait_s=1.0, wait_fraction=1000.0)  # windows of up to 1 s
        b.seed_run_times("m", {("student", 4): 0.004})
        b.start()
        await asyncio.gather(*(b.submit(("m", "student", 4), *noise(), timeout_s=10)
                               for _ in range(4)))  # a batch of 4: expect 4 back
        started = time.monotonic()
        await b.submit(("m", "student", 4), *noise(), timeout_s=10, deadline_s=deadline_s)
        took = time.monotonic() - started
        await b.close(5)
        return took

    assert asyncio.run(scenario(0.3)) < 0.3  # in time (it would wait ~1 s for company)
    assert asyncio.run(scenario(None)) > 0.5  # the same window does hold a plain request


def test_teacher_chunks_shrink_to_the_chunk_budget():
    from halfstep.server.lanes import Lane
    from halfstep.server.scheduler_run import TeacherRun

    b = make(FakeEngine(), chunk_steps=8, chunk_budget_s=0.1)
    lane = Lane(("m", "teacher", 256))
    lane.image_step_s = 0.004

    def chunk(rows: int) -> int:
        job = SimpleNamespace(n=rows)
        return b.chunk_for(TeacherRun(lane, [job], torch.zeros(rows, *SHAPE),
                                      torch.zeros(rows, dtype=torch.int64)))

    assert chunk(1) == 8  # 8 steps of one image: 32 ms
    assert chunk(5) == 5  # 20 ms per step: five fit in 0.1 s
    assert chunk(64) == 1  # 256 ms per step: one step per turn, never zero


def test_deadline_predictions_are_calibrated_by_their_recent_tail(monkeypatch):
    """Once deadline jobs have finished later than predicted, the engine's share of a deadline
    shrinks by that tail (a high quantile, at least 1, capped, forgotten after a minute)."""
    from halfstep.server import estimates
    from halfstep.server.routes import engine_share

    b = make(FakeEngine())
    assert b.deadline_slack() == 1.0
    for _ in range(19):
        b.observe_deadline_job(actual_s=0.2, predicted_s=0.1)
    assert b.deadline_slack() == 1.0  # too few to trust yet
    b.observe_deadline_job(actual_s=0.3, predicted_s=0.1)
    assert b.deadline_slack() == pytest.approx(2.0)  # 20 samples: their 90th percentile
    for _ in range(80):
        b.observe_deadline_job(actual_s=0.1, predicted_s=0.1)
    # 100 ratios: 80 x 1.0, 19 x 2.0, 1 x 3.0: the 99th percentile is 3.0, the 90th 2.0
    assert b.deadline_slack() == pytest.approx(3.0)
    for _ in range(10):
        b.observe_deadline_job(actual_s=1.0, predicted_s=0.1)
    assert b.deadline_slack() == estimates.CALIBRATION_MAX  # capped
    state = SimpleNamespace(batcher=b, overhead_s=0.002)
    assert engine_share(state, 0.1) == pytest.approx(0.1 / estimates.CALIBRATION_MAX - 0.002)
    assert engine_share(state, None) is None
    later = time.monotonic() + estimates.CALIBRATION_AGE_S + 1
    monkeypatch.setattr(estimates.time, "monotonic", lambda: later)
    assert b.deadline_slack() == 1.0  # all of them aged out
    assert engine_share(state, 0.1) == pytest.approx(0.098)
