"""The server's limits on every route that generates: /v2 infer goes through the same admission
checks as /generate (readiness, the teacher limit), its body limit fits 64 binary NOISE images
while /generate keeps its own, 422s say this server's teacher limit, refusals while not ready
count under their own reason, and `halfstep serve --auth-metrics` reads a boolean."""

from __future__ import annotations

import argparse
import json

import httpx
import numpy as np
import pytest

from halfstep.server.cli import log_config, register
from halfstep.server.middleware import infer_body_bytes
from halfstep.server.oip_tensors import HEADER_LENGTH
from halfstep.server.request import MAX_N

from .test_server_support import call, make_app, metric_value, serving

INFER = "/v2/models/tiny/infer"




def binary_noise(n: int, shape: tuple[int, ...]) -> tuple[bytes, dict[str, str]]:
    """An infer request body with n NOISE images as binary tensor data, and its headers."""
    noise = np.zeros((n, *shape), "<f4")
    header = json.dumps({"inputs": [{"name": "NOISE", "datatype": "FP32", "shape": [n, *shape],
                                     "parameters": {"binary_data_size": noise.nbytes}}],
                         "parameters": {"steps": 1}}).encode()
    return header + noise.tobytes(), {HEADER_LENGTH: str(len(header)),
                                      "content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def live(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)  # the default 16 KiB body limit
    with serving(app) as url:
        yield url, app


def test_infer_accepts_64_binary_noise_images_while_generate_keeps_its_limit(live):
    url, app = live
    shape = app.state.halfstep.bundle.image_shape
    body, headers = binary_noise(MAX_N, shape)
    assert len(body) > app.state.halfstep.settings.max_body_bytes
    assert len(body) <= infer_body_bytes(MAX_N, shape)
    with httpx.Client(base_url=url, timeout=120) as h:
        ok = h.post(INFER, content=body, headers=headers)
        versioned = h.post("/v2/models/tiny/versions/1/infer", content=body, headers=headers)
        big = h.post("/generate", content=b" " * 20_000,
                     headers={"content-type": "application/json"})
        too_big = h.post(INFER, content=b" " * (infer_body_bytes(MAX_N, shape) + 1))
    assert ok.status_code == 200, ok.text[:300]
    assert versioned.status_code == 200
    assert big.status_code == 413 and "16384" in big.json()["error"]
    assert too_big.status_code == 413 and "binary" in too_big.json()["error"]


def test_infer_applies_the_teacher_limit(live):
    url, _ = live
    with httpx.Client(base_url=url, timeout=60) as h:
        over = h.post(INFER, json={"inputs": [{"name": "SEED", "datatype": "INT64",
                                               "shape": [1], "data": [1]}],
                                   "parameters": {"model": "teacher", "steps": 20}})
    assert over.status_code == 400
    assert "over this server's limit of 16 (--max-teacher-steps)" in over.json()["error"]


def test_422_says_this_servers_teacher_limit_and_when_it_is_off(live):
    url, app = live
    settings = app.state.halfstep.settings
    with httpx.Client(base_url=url, timeout=60) as h:
        limited = h.post("/generate", params={"model": "teacher", "steps": 20})
        settings.teacher = "off"
        try:
            off = h.post("/generate", params={"model": "teacher", "steps": 2})
        finally:
            settings.teacher = "on"
    assert limited.status_code == 422
    assert "teacher: exact, 1..16" in limited.json()["allowed"]["steps"]
    assert off.status_code == 422 and off.json()["allowed"]["model"] == ["student"]
    assert "turned off" in off.json()["allowed"]["steps"]


def test_openapi_steps_description_says_the_teacher_limit(tiny_bundle_dir):
    app, _ = make_app(tiny_bundle_dir, max_teacher_steps=24)
    schema = call(app, "GET", "/openapi.json").json()
    [steps] = [p for p in schema["paths"]["/generate"]["post"]["parameters"]
               if p["name"] == "steps"]
    assert "teacher at most 24 steps here" in steps["description"]


def test_not_ready_is_503_on_both_apis_and_counted_as_not_ready(tiny_bundle_dir):
    app, _ = make_app(tiny_bundle_dir)
    seed = {"inputs": [{"name": "SEED", "datatype": "INT64", "shape": [1], "data": [1]}]}
    infer = call(app, "POST", INFER, json=seed)
    generate = call(app, "POST", "/generate", params={"steps": 1})
    assert infer.status_code == generate.status_code == 503
    assert infer.headers["retry-after"] == generate.headers["retry-after"] == "1"
    assert "warming up" in infer.json()["error"]
    text = call(app, "GET", "/metrics").text
    assert metric_value(text, "halfstep_rejected_total", 'reason="not_ready"') == 2
    assert metric_value(text, "halfstep_rejected_total", 'reason="draining"') == 0
    assert 'reason="unhealthy"' in text


def test_serve_reads_auth_metrics_as_a_boolean(capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    assert parser.parse_args(["serve", "--auth-metrics", "false"]).auth_metrics is False
    assert parser.parse_args(["serve", "--auth-metrics", "on"]).auth_metrics is True
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--auth-metrics", "maybe"])
    assert "is not a boolean: use true/false" in capsys.readouterr().err


def test_every_log_line_carries_the_request_id():
    config = log_config()
    assert "request_id" in config["handlers"]["default"]["filters"]
    assert "[%(request_id)s]" in config["formatters"]["default"]["fmt"]
