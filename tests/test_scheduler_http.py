"""The scheduler over real HTTP: Server-Timing predicted vs. actual, bounded lane labels,
admission by queued seconds (503 + a computed Retry-After)."""

from __future__ import annotations

import asyncio

import pytest

from halfstep.server.client import AsyncClient, Client, HalfstepError

from .test_server_batcher import hold_engine, until
from .test_server_support import lane_of, make_app, metric_value, serving


def test_server_timing_and_lane_metrics(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url, Client(url) as c:
        r = c.http.post("/generate", params={"steps": 2, "seed": 1})
        c.generate(model="teacher", steps=3)
        text = c.metrics()
        lanes = c.models()["lanes"]
    timing = r.headers["server-timing"]
    assert "predicted;dur=" in timing and "actual;dur=" in timing and "queue;dur=" in timing
    # client-chosen teacher steps never become a label value: the lane is "teacher"
    b = f'bundle="{app.state.halfstep.default}"'
    labels = f'{b},model="teacher",status="200",steps="teacher"'
    assert metric_value(text, "halfstep_request_duration_seconds_count", labels) == 1
    assert 'steps="3"' not in text
    assert metric_value(text, "halfstep_lane_queue_depth", f'{b},lane="2"') == 0
    assert metric_value(text, "halfstep_padded_rows_total", f'{b},lane="2"') == 3  # 1 -> 4 rows
    assert metric_value(text, "halfstep_lane_batch_seconds", f'{b},lane="teacher"') > 0
    assert metric_value(text, "halfstep_engine_busy_seconds_total") > 0
    assert lanes["student:2"]["batch_ms"] > 0 and lanes["teacher:3"]["queued"] == 0


def test_backlog_over_the_bound_answers_503_with_retry_after(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:

        async def scenario():
            async with AsyncClient(url) as ac:
                with engine.held():
                    blocker = await hold_engine(ac, engine)
                    await until(lambda: _running(app))
                    app.state.halfstep.settings.max_backlog_s = 1e-6  # any work is over it
                    with pytest.raises(HalfstepError) as err:
                        await ac.generate(steps=8, n=4)
                await blocker
                return err.value, await ac.metrics()

        err, text = asyncio.run(scenario())
    assert err.status == 503 and "over the bound" in err.body["error"]
    assert int(err.headers["retry-after"]) >= 1
    assert metric_value(text, "halfstep_rejected_total", 'reason="overloaded"') == 1


async def _running(app) -> bool:
    return app.state.halfstep.batcher.backlog_s() > 0


def test_deadline_ms_picks_the_student_and_refuses_what_cannot_be_met(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir, max_request_s=1000.0)  # the cost cap is not tested
    with serving(app) as url, Client(url) as c:
        # pretend every student costs 10 s per image-step: 8 steps = 80 s, 4 = 40 s, 1 = 10 s
        for steps in (1, 2, 4, 8):
            lane_of(app, steps).image_step_s = 10.0
        roomy = c.http.post("/generate", params={"steps": 8, "deadline_ms": 600_000})
        tight = c.http.post("/generate", params={"steps": 8, "deadline_ms": 50_000})
        hopeless = c.http.post("/generate", params={"steps": 8, "deadline_ms": 5_000})
    assert roomy.status_code == 200 and roomy.headers["x-halfstep-steps"] == "8"
    assert tight.status_code == 200 and tight.headers["x-halfstep-steps"] == "4"
    assert "predicted;dur=40000" in tight.headers["server-timing"]
    assert hopeless.status_code == 503 and int(hopeless.headers["retry-after"]) >= 5
    assert "no student meets deadline_ms=5000" in hopeless.json()["error"]
