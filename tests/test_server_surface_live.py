"""The HTTP surface over real HTTP with the batcher running: failed batches answer a bare 500,
the backend header names the engine that ran, and the access log line describes the request."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from halfstep.distill.bundle import Bundle
from halfstep.engines.eager import TorchEngine
from halfstep.engines.fallback import TeacherFallback
from halfstep.server.access_log import RequestIdFilter
from halfstep.server.codec import backend_for

from .test_server_support import (
    InstrumentedEngine,
    make_app,
    micro_bundle_dir,  # noqa: F401  (fixture)
    serving,
)


class CompiledStudents(InstrumentedEngine):
    """Stands in for a compiled students-only engine (ONNX Runtime)."""

    name = "onnxruntime"


@pytest.fixture(scope="module")
def failing(micro_bundle_dir):  # noqa: F811
    engine = InstrumentedEngine(Bundle(micro_bundle_dir))
    engine.fail_steps = {2}
    app, _ = make_app(micro_bundle_dir, engine=engine)
    with serving(app) as url:
        yield url


def test_a_failed_batch_answers_500_without_the_engine_text(failing, caplog):
    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        r = httpx.post(f"{failing}/generate", params={"steps": 2},
                       headers={"X-Request-ID": "rid-fail"}, timeout=60)
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (request id rid-fail)"}
    failed = [rec for rec in caplog.records if "injected failure" in rec.getMessage()]
    assert failed and failed[0].request_id == "rid-fail"


def test_access_log_has_lane_and_timings_of_a_generate(failing, caplog):
    with caplog.at_level(logging.INFO, logger="halfstep.access"):
        r = httpx.post(f"{failing}/generate", params={"steps": 4, "seed": 2**53 - 1},
                       headers={"X-Request-ID": "rid-ok"}, timeout=60)
    assert r.status_code == 200 and r.headers["x-halfstep-seed"] == str(2**53 - 1)
    assert r.headers["x-request-id"] == "rid-ok"
    lines = [json.loads(rec.getMessage()) for rec in caplog.records
             if rec.name == "halfstep.access"]
    line = next(x for x in lines if x["request_id"] == "rid-ok")
    assert (line["method"], line["path"], line["status"]) == ("POST", "/generate", 200)
    assert (line["model"], line["steps"], line["lane"]) == ("student", 4, "4")
    assert line["n"] == 1 and line["batch_size"] >= 1
    assert {"queue_ms", "run_ms", "encode_ms", "duration_ms"} <= set(line)


def test_backend_header_names_the_teachers_eager_engine(micro_bundle_dir):  # noqa: F811
    bundle = Bundle(micro_bundle_dir)
    engine = TeacherFallback(CompiledStudents(bundle), TorchEngine(bundle, "cpu", (4, 8)))
    assert backend_for(engine, "teacher") == "torch"
    assert backend_for(engine, "student") == "onnxruntime"
    app, _ = make_app(micro_bundle_dir, engine=engine)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        teacher = h.post("/generate", params={"model": "teacher", "steps": 2})
        student = h.post("/generate", params={"steps": 1})
        as_json = h.post("/generate", params={"model": "teacher", "steps": 2, "format": "json"})
    assert teacher.status_code == student.status_code == as_json.status_code == 200
    assert teacher.headers["x-halfstep-backend"] == "torch"
    assert student.headers["x-halfstep-backend"] == "onnxruntime"
    assert as_json.json()["backend"] == as_json.headers["x-halfstep-backend"] == "torch"
