"""The hardened serving loop over HTTP: teacher limits and the per-request cost cap, 503 before
and after a failed warm-up, /healthz after a stalled batch or a failed engine, readiness not
tied to the queue, exact=true with deadline_ms."""

from __future__ import annotations

import threading

import httpx

from halfstep.distill.bundle import Bundle
from halfstep.server.settings import Settings

from .test_server_support import InstrumentedEngine, lane_of, make_app, serving


def test_teacher_limits_and_the_cost_cap(tiny_bundle_dir):
    app, _ = make_app(tiny_bundle_dir)  # tiny bundle: teacher default 16, max 64 steps
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        ok = c.post("/generate", params={"model": "teacher", "steps": 16})
        over = c.post("/generate", params={"model": "teacher", "steps": 32})
        app.state.halfstep.settings.teacher = "off"
        off = c.post("/generate", params={"model": "teacher", "steps": 4})
        app.state.halfstep.settings.teacher = "on"
        app.state.halfstep.settings.max_teacher_steps = 64
        allowed = c.post("/generate", params={"model": "teacher", "steps": 24})
        for steps in (1, 2, 4, 8):  # pretend 8 s per image-step: n=4 at 8 steps is 256 s
            lane_of(app, steps).image_step_s = 8.0
        costly = c.post("/generate", params={"steps": 8, "n": 4})
        fits = c.post("/generate", params={"steps": 1, "n": 1, "exact": True})
    assert ok.status_code == 200 and allowed.status_code == 200
    assert over.status_code == 422 and "limit of 16 (--max-teacher-steps)" in over.json()["error"]
    assert off.status_code == 422 and "--teacher off" in off.json()["error"]
    assert costly.status_code == 422
    assert "256.0 s of engine time" in costly.json()["error"]
    assert "(--max-request-s); ask for steps <= 1 (a smaller student)" in costly.json()["error"]
    assert fits.status_code == 200


def test_settings_read_flags_then_environment_then_defaults():
    env = {"HALFSTEP_TEACHER": "off", "HALFSTEP_MAX_TEACHER_STEPS": "32",
           "HALFSTEP_MAX_REQUEST_S": "5", "HALFSTEP_WATCHDOG_FACTOR": "20"}
    s = Settings.from_env(env, max_request_s=7.5)
    assert (s.teacher, s.max_teacher_steps, s.max_request_s, s.watchdog_factor) == (
        "off", 32, 7.5, 20.0)
    d = Settings.from_env({})
    assert (d.teacher, d.max_teacher_steps, d.max_request_s, d.watchdog_factor) == (
        "on", None, 60.0, 10.0)


class SlowWarmup(InstrumentedEngine):
    def __init__(self, bundle, fail: bool = False) -> None:
        super().__init__(bundle)
        self.release, self.fail = threading.Event(), fail

    def warmup(self, keys=None):
        assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("out of memory during warm-up")
        return super().warmup(keys)


def test_generate_answers_503_while_warming_up_and_after_a_failed_warm_up(tiny_bundle_dir):
    for fail in (False, True):
        engine = SlowWarmup(Bundle(tiny_bundle_dir), fail=fail)
        app, _ = make_app(tiny_bundle_dir, engine=engine)
        with serving(app, ready=False) as url, httpx.Client(base_url=url, timeout=30) as c:
            early = c.post("/generate", params={"steps": 1})
            engine.release.set()
            while app.state.halfstep.warmup is None:
                threading.Event().wait(0.02)
            late = c.post("/generate", params={"steps": 1})
            ready = c.get("/readyz")
        assert early.status_code == 503 and early.headers["retry-after"] == "1"
        assert "warming up" in early.json()["error"]
        if fail:
            assert late.status_code == 503 and "warm-up failed" in late.json()["error"]
            assert ready.status_code == 503
            assert ready.json()["reason"] == "warm-up failed (see the server log)"
            assert "out of memory" not in late.text + ready.text  # the log has it
        else:
            assert late.status_code == 200 and ready.status_code == 200


def test_a_stalled_batch_turns_liveness_off(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        assert c.get("/healthz").status_code == 200
        app.state.halfstep.batcher.watchdog_min_s = 0.3
        lane_of(app, 1).image_step_s = 0.001
        with engine.held():
            stalled = c.post("/generate", params={"steps": 1})
            health, ready = c.get("/healthz"), c.get("/readyz")
            after = c.post("/generate", params={"steps": 2})
    assert stalled.status_code == 503 and "engine stalled" in stalled.json()["error"]
    assert health.status_code == 503 and "engine stalled" in health.json()["reason"]
    assert ready.status_code == 503 and after.status_code == 503


def test_a_failed_engine_turns_liveness_and_readiness_off(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        engine.failure = "CUDA graph capture failed: RuntimeError: boom"
        health, ready = c.get("/healthz"), c.get("/readyz")
    assert health.status_code == 503 and "capture failed" in health.json()["reason"]
    assert ready.status_code == 503 and "capture failed" in ready.json()["reason"]


def test_exact_with_deadline_never_drops_to_a_smaller_student(tiny_bundle_dir):
    app, _ = make_app(tiny_bundle_dir, max_request_s=1000.0)
    with serving(app) as url, httpx.Client(base_url=url, timeout=30) as c:
        for steps in (1, 2, 4, 8):  # 8 steps: 80 s; 2 steps: 20 s
            lane_of(app, steps).image_step_s = 10.0
        budget = c.post("/generate", params={"steps": 8, "deadline_ms": 20_000})
        exact = c.post("/generate", params={"steps": 8, "deadline_ms": 20_000, "exact": True})
    assert budget.status_code == 200 and budget.headers["x-halfstep-steps"] == "2"  # 20 s
    assert exact.status_code == 503 and int(exact.headers["retry-after"]) >= 60
    assert "deadline" in exact.json()["error"]
