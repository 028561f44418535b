"""The /generate, /v1/models and health contract, end to end over real HTTP (uvicorn, loopback)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image

from halfstep.distill.bundle import Bundle
from halfstep.distill.images import make_grid, to_uint8
from halfstep.server.client import Client, HalfstepError

from .conftest import build_tiny_bundle
from .test_server_support import expected_images, make_app, serving


@pytest.fixture(scope="module")
def server(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        yield url, engine


def pixels(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def test_png_uses_the_largest_student_within_the_budget(server):
    url, engine = server
    with Client(url) as c:
        got = c.generate(steps=7, seed=11, label=3)
    assert got.headers["content-type"] == "image/png"
    assert (got.steps, got.seed, got.model) == (4, 11, "student")
    assert got.headers["x-halfstep-grid"] == "1x1"
    want = to_uint8(expected_images(engine, "student", 4, 11, 1, 3))[0, ..., 0]
    np.testing.assert_array_equal(pixels(got.content), want)


def test_grid_layout_and_json_agree(server):
    url, engine = server
    with Client(url) as c:
        grid = c.generate(steps=2, seed=5, n=5)
        js = c.generate(steps=2, seed=5, n=5, format="json")
    assert grid.headers["x-halfstep-grid"] == "2x3"  # cols = ceil(sqrt(5)), row-major
    body = js.json
    assert [im["seed"] for im in body["images"]] == [5, 6, 7, 8, 9]
    used = (body["model"], body["steps"], body["requested_steps"], body["n"])
    assert used == ("student", 2, 2, 5)
    assert set(body["timings"]) == {"queue_s", "run_s", "encode_s", "total_s"}
    singles = np.stack([pixels(p)[..., None] for p in js.pngs])
    np.testing.assert_array_equal(pixels(grid.content), make_grid(singles)[..., 0])
    want = to_uint8(expected_images(engine, "student", 2, 5, 5, None))
    np.testing.assert_array_equal(singles, want)


def test_json_body_equals_query_and_teacher_steps_are_exact(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=60) as h:
        q = h.post("/generate", params={"model": "teacher", "steps": 3, "seed": 2})
        b = h.post("/generate", json={"model": "teacher", "steps": 3, "seed": 2})
    assert q.status_code == b.status_code == 200
    assert q.headers["x-halfstep-steps"] == "3" and q.headers["x-halfstep-model"] == "teacher"
    assert q.content == b.content


def test_random_seed_is_echoed_and_reproduces(server):
    url, _ = server
    with Client(url) as c:
        first = c.generate(steps=1)
        again = c.generate(steps=1, seed=first.seed)
    assert first.content == again.content


@pytest.mark.parametrize("params, status, needle", [
    ({"steps": 0}, 422, "greater than or equal to 1"),
    ({"n": 65}, 422, "less than or equal to 64"),
    ({"n": 0}, 422, "n"),
    ({"label": 10}, 422, "label"),
    ({"label": -1}, 422, "label"),
    ({"seed": -1}, 422, "seed"),
    ({"seed": 2**63}, 422, "seed"),
    ({"seed": 2**53}, 422, "less than or equal to 9007199254740991"),
    ({"model": "ema"}, 422, "'student' or 'teacher'"),
    ({"format": "gif"}, 422, "'png' or 'json'"),
    ({"steps": "four"}, 422, "valid integer"),
    ({"model": "teacher", "steps": 65}, 422, "1..64"),
])
def test_invalid_inputs_are_4xx_json_saying_what_is_allowed(server, params, status, needle):
    url, _ = server
    r = httpx.post(f"{url}/generate", params=params, timeout=30)
    assert r.status_code == status
    body = r.json()
    assert needle in body["error"]
    assert "student: a budget" in body["allowed"]["steps"]


def test_body_errors(server):
    url, _ = server
    with httpx.Client(base_url=url, timeout=30) as h:
        both = h.post("/generate", params={"steps": 2}, json={"steps": 4})
        extra = h.post("/generate", json={"stepz": 4})
        broken = h.post("/generate", content=b"{no", headers={"content-type": "application/json"})
        huge = h.post("/generate", content=b"{" + b" " * 100_000 + b"}",
                      headers={"content-type": "application/json"})
        missing = h.get("/nope")
    assert both.status_code == 422 and "both in the query and in the body" in both.json()["error"]
    assert extra.status_code == 422 and "stepz" in extra.json()["error"]
    assert broken.status_code == 422 and "JSON" in broken.json()["error"]
    assert huge.status_code == 413 and "bytes" in huge.json()["error"]
    assert missing.status_code == 404 and missing.json()["error"]


def test_budget_below_the_smallest_student_lists_what_is_available(tmp_path):
    bundle_dir = build_tiny_bundle(tmp_path / "b", steps=(2, 4))
    app, _ = make_app(bundle_dir)
    with serving(app) as url, Client(url) as c:
        with pytest.raises(HalfstepError) as err:
            c.generate(steps=1)
        assert c.generate(steps=3).steps == 2
    assert err.value.status == 422
    assert "available: 2, 4" in err.value.body["error"]


def test_models_health_and_docs(server, tiny_bundle_dir):
    url, engine = server
    with Client(url) as c:
        info = c.models()
    bundle = Bundle(tiny_bundle_dir)
    assert info == {
        "name": bundle.name, "image_shape": [1, 28, 28], "num_labels": 10,
        "student_steps": [1, 2, 4, 8], "teacher_default_steps": 16, "teacher_max_steps": 64,
        "teacher_limit": 16,
        "backend": "torch", "batch_buckets": [4, 8], "max_batch": 8, "max_n": 64,
        "lanes": info["lanes"],  # checked below
        "generation": 1, "sha256": info["sha256"], "default": bundle.name,
        "bundles": info["bundles"],
    }
    assert len(info["sha256"]) == 64
    assert [b["name"] for b in info["bundles"]] == [bundle.name]
    assert {k: v for k, v in info["bundles"][0].items() if k != "lanes"} == {
        k: v for k, v in info.items() if k not in ("lanes", "default", "bundles")}
    assert set(info["lanes"]) >= {"student:1", "student:2", "student:4", "student:8"}
    assert info["lanes"]["student:1"]["predicted_lone_ms"] > 0  # from the warm-up
    assert httpx.get(f"{url}/healthz").json() == {"status": "alive"}
    assert httpx.get(f"{url}/readyz").json()["status"] == "ready"
    assert httpx.get(f"{url}/docs").status_code == 200
    schema = httpx.get(f"{url}/openapi.json").json()
    assert {"/generate", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(schema["paths"])


def test_n_larger_than_max_batch_runs_in_chunks(server):
    url, engine = server
    with Client(url) as c:
        got = c.generate(steps=1, seed=0, n=10, format="json")
    assert len(got.pngs) == 10
    want = to_uint8(expected_images(engine, "student", 1, 0, 10, None))
    np.testing.assert_array_equal(np.stack([pixels(p)[..., None] for p in got.pngs]), want)
    assert base64.b64decode(got.json["images"][0]["png"])[:8] == b"\x89PNG\r\n\x1a\n"
