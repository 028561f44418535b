"""The dynamic batcher over real HTTP: merging, determinism, queue full, deadline, cancellation,
failing batches. The engine is held at a gate so queues form deterministically, not by timing."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from halfstep.server.client import AsyncClient, Client, HalfstepError

from .test_server_support import make_app, metric_value, serving


async def until(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.02)


async def metric(ac: AsyncClient, name: str, labels: str = "") -> float:
    return metric_value(await ac.metrics(), name, labels)


async def hold_engine(ac: AsyncClient, engine) -> asyncio.Task:
    """Start a steps=1 request and wait until the engine thread is stuck at its gate."""
    blocker = asyncio.create_task(ac.generate(steps=1, seed=0))
    assert await asyncio.to_thread(engine.entered.wait, 30)
    return blocker


def test_concurrent_requests_merge_and_bytes_do_not_depend_on_the_batch(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        with Client(url) as c:
            alone = c.generate(steps=2, seed=100, n=2, label=1).content

        async def burst():
            async with AsyncClient(url) as ac:
                with engine.held():
                    blocker = await hold_engine(ac, engine)
                    tasks = [asyncio.create_task(ac.generate(steps=2, seed=100, n=2, label=1)),
                             asyncio.create_task(ac.generate(steps=2, seed=7, n=3)),
                             asyncio.create_task(ac.generate(steps=2, seed=9, label=4))]
                    await until(lambda: _depth_is(ac, 3))
                results = await asyncio.gather(blocker, *tasks)
                return results, await ac.metrics()

        results, text = asyncio.run(burst())
    assert ("student", 2, 6) in engine.calls  # three requests, one engine call
    assert results[1].content == alone  # padded to 8 with strangers vs. alone (padded to 4)
    count = metric_value(text, "halfstep_batch_size_count")
    assert metric_value(text, "halfstep_batch_size_bucket", 'le="4.0"') < count  # a batch > 4
    assert metric_value(text, "halfstep_batch_size_sum") >= 6 + 1


async def _depth_is(ac: AsyncClient, n: int) -> bool:
    return await metric(ac, "halfstep_queue_depth") == n


def test_full_queue_answers_503_at_once(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir, max_queue=2)
    with serving(app) as url:

        async def scenario():
            async with AsyncClient(url) as ac:
                with engine.held():
                    blocker = await hold_engine(ac, engine)
                    queued = [asyncio.create_task(ac.generate(steps=2, seed=s)) for s in (1, 2)]
                    await until(lambda: _depth_is(ac, 2))
                    t0 = time.monotonic()
                    with pytest.raises(HalfstepError) as err:
                        await ac.generate(steps=2, seed=3)
                    elapsed = time.monotonic() - t0
                    ready = await ac.http.get("/readyz")
                done = await asyncio.gather(blocker, *queued)
                return err.value, elapsed, ready, done, await ac.metrics()

        err, elapsed, ready, done, text = asyncio.run(scenario())
    assert err.status == 503 and err.headers["retry-after"] == "1"
    assert "queue is full" in err.body["error"]
    assert elapsed < 5  # refused at once, not after the held batch
    assert ready.status_code == 200  # overload is shed with 503, the pod stays ready
    assert [d.steps for d in done] == [1, 2, 2]  # what was accepted still ran
    assert metric_value(text, "halfstep_rejected_total", 'reason="queue_full"') == 1


def test_request_past_its_deadline_gets_504_and_never_runs(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir, timeout_s=0.5)
    with serving(app) as url:

        async def scenario():
            async with AsyncClient(url) as ac:
                with engine.held():
                    blocker = await hold_engine(ac, engine)
                    t0 = time.monotonic()
                    with pytest.raises(HalfstepError) as err:
                        await ac.generate(steps=2, seed=1)
                    elapsed = time.monotonic() - t0
                    still_held = not engine.gate.is_set()
                await blocker
                after = await ac.generate(steps=4)
                return err.value, elapsed, still_held, after, await ac.metrics()

        err, elapsed, still_held, after, text = asyncio.run(scenario())
    assert err.status == 504 and "deadline" in err.body["error"]
    assert still_held and elapsed < 5  # answered while the engine was busy (triton core #333)
    assert not [c for c in engine.calls if c[1] == 2]  # it never ran
    assert after.steps == 4
    assert metric_value(text, "halfstep_rejected_total", 'reason="deadline"') == 1


def test_disconnected_client_is_dropped_before_its_batch_runs(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:

        async def scenario():
            async with AsyncClient(url) as ac:
                with engine.held():
                    blocker = await hold_engine(ac, engine)
                    async with AsyncClient(url, timeout=0.5) as impatient:
                        for seed in range(3):  # a burst of client timeouts (ray #41057)
                            with pytest.raises(httpx.ReadTimeout):
                                await impatient.generate(steps=2, seed=seed)
                    await until(lambda: _cancelled_is(ac, 3))
                    depth = await metric(ac, "halfstep_queue_depth")
                await blocker
                after = await ac.generate(steps=2, seed=9)  # the loop did not hang (ray #50046)
                return depth, after

        depth, after = asyncio.run(scenario())
    assert depth == 0
    assert [c for c in engine.calls if c[1] == 2] == [("student", 2, 1)]  # only the last one
    assert after.steps == 2


async def _cancelled_is(ac: AsyncClient, n: int) -> bool:
    return await metric(ac, "halfstep_rejected_total", 'reason="cancelled"') == n


def test_a_failing_batch_fails_only_its_requests(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    engine.fail_steps, engine.short_steps = {2}, {1}
    with serving(app) as url, Client(url) as c:
        with pytest.raises(HalfstepError) as failed:
            c.generate(steps=2)
        with pytest.raises(HalfstepError) as short:
            c.generate(steps=1, n=3)
        ok = c.generate(steps=4)
        text = c.metrics()
    # the engine's text goes to the log; the body names the request (errors.py)
    assert failed.value.status == 500 and short.value.status == 500
    assert ok.steps == 4
    assert metric_value(text, "halfstep_rejected_total", 'reason="error"') == 2
    assert metric_value(text, "halfstep_requests_total", 'status="500"') == 2


def test_a_lone_request_at_an_idle_engine_runs_at_once(tiny_bundle_dir):
    """Batches form when the engine frees up: a lone request at an idle engine expects no
    company, so it runs at once even with a large max_wait_ms (it used to wait max_wait_ms
    while its key had no batch time estimate)."""
    app, engine = make_app(tiny_bundle_dir, max_wait_ms=1500.0, max_wait_fraction=0.1)
    assert engine.warm_keys == [("student", 1)]  # warm-up times steps=1 only
    with serving(app) as url, Client(url) as c:
        waits = []
        for steps in (2, 2, 1):
            c.generate(steps=steps, seed=len(waits))
            total = metric_value(c.metrics(), "halfstep_queue_wait_seconds_sum")
            waits.append(total - sum(waits))
    assert set(engine.warm_run_s) == {("student", 1)}
    assert max(waits) < 1.0


def test_wait_limit_rule():
    from halfstep.server.batcher import Batcher
    from halfstep.server.metrics import Metrics

    def limit(fraction, recent=None):
        b = Batcher({}, max_batch=8, max_wait_s=0.005, max_queue=4, metrics=Metrics(),
                    wait_fraction=fraction)
        if recent is not None:
            b.lane(("m", "student", 4)).batch_s = recent
        return b.wait_limit(("m", "student", 4))

    assert limit(0.1) == 0.005  # no batch of this key yet: the configured bound
    assert limit(0.1, recent=0.020) == pytest.approx(0.002)  # 10% of a 20 ms batch
    assert limit(0.1, recent=1.0) == 0.005  # a slow key: the bound
    assert limit(1000.0, recent=0.001) == 0.005
    assert limit(0.0) == limit(0.0, recent=1.0) == 0.0  # 0: never wait

    b = Batcher({}, max_batch=8, max_wait_s=0.005, max_queue=4, metrics=Metrics())
    b.lane(("m", "student", 2)).observe(rows=1, run_s=0.030)
    b.seed_run_times("m", {("student", 4): 0.020, ("student", 2): 1.0})
    assert b.wait_limit(("m", "student", 4)) == pytest.approx(0.002)
    assert b.wait_limit(("m", "student", 2)) == pytest.approx(0.003)  # a measured batch wins
