"""The Open Inference Protocol (v2) routes over real HTTP with plain httpx: JSON and binary
tensors, the same pixels as /generate, refusals as {"error": ...} with OIP status codes."""

from __future__ import annotations

import json

import httpx
import numpy as np
import pytest
import torch

from halfstep.distill.images import to_uint8
from halfstep.distill.sampling import noise_for_seeds
from halfstep.server.oip_tensors import HEADER_LENGTH

from .test_oip_support import make_oip_app, png_pixels
from .test_server_support import expected_images, metric_value, serving

INFER = "/v2/models/tiny/infer"


@pytest.fixture(scope="module")
def oip_server(tiny_bundle_dir):
    app, engine = make_oip_app(tiny_bundle_dir)
    with serving(app) as url:
        yield url, engine


def seed_input(*seeds: int) -> dict:
    return {"name": "SEED", "datatype": "INT64", "shape": [len(seeds)], "data": list(seeds)}


def test_metadata_health_and_readiness(oip_server):
    url, _ = oip_server
    with httpx.Client(base_url=url, timeout=60) as h:
        server = h.get("/v2").json()
        model = h.get("/v2/models/tiny").json()
        assert h.get("/v2/health/live").status_code == 200
        assert h.get("/v2/health/ready").status_code == 200
        assert h.get("/v2/models/tiny/ready").status_code == 200
        assert h.get("/v2/models/tiny/versions/1/ready").status_code == 200
        assert h.get("/v2/models/other/ready").status_code == 404
        assert h.get("/v2/models/tiny/versions/7").status_code == 404
    assert server["name"] == "halfstep" and "binary_tensor_data" in server["extensions"]
    assert model["name"] == "tiny" and model["versions"] == ["1"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in model["inputs"]} == {
        "SEED": ("INT64", [-1]), "LABEL": ("INT64", [-1]), "NOISE": ("FP32", [-1, 1, 28, 28])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "IMAGE": ("UINT8", [-1, 28, 28, 1]), "IMAGE_FP32": ("FP32", [-1, 1, 28, 28])}


def test_json_infer_equals_generate_png(oip_server):
    url, engine = oip_server
    with httpx.Client(base_url=url, timeout=60) as h:
        got = h.post(INFER, json={"id": "a1", "inputs": [seed_input(11)],
                                  "parameters": {"steps": 7}})
        png = h.post("/generate", params={"seed": 11, "steps": 7, "format": "png"})
    assert got.status_code == 200, got.text
    body = got.json()
    assert body["id"] == "a1" and body["model_name"] == "tiny"
    assert body["parameters"] == {"model": "student", "steps": 4, "requested_steps": 7}
    [out] = body["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("IMAGE", "UINT8", [1, 28, 28, 1])
    image = np.array(out["data"], dtype=np.uint8).reshape(out["shape"])
    np.testing.assert_array_equal(image[0], png_pixels(png.content))
    want = to_uint8(expected_images(engine, "student", 4, 11, 1, None))
    np.testing.assert_array_equal(image, want)


def test_binary_request_and_response_per_image_seeds_and_labels(oip_server):
    url, engine = oip_server
    seeds, labels = np.array([5, 40], "<i8"), np.array([3, -1], "<i8")
    header = json.dumps({
        "inputs": [
            {"name": "SEED", "datatype": "INT64", "shape": [2],
             "parameters": {"binary_data_size": 16}},
            {"name": "LABEL", "datatype": "INT64", "shape": [2],
             "parameters": {"binary_data_size": 16}},
        ],
        "outputs": [{"name": "IMAGE", "parameters": {"binary_data": True}},
                    {"name": "IMAGE_FP32"}],
        "parameters": {"steps": 2},
    }).encode()
    with httpx.Client(base_url=url, timeout=60) as h:
        got = h.post(INFER, content=header + seeds.tobytes() + labels.tobytes(),
                     headers={HEADER_LENGTH: str(len(header))})
    assert got.status_code == 200, got.text
    size = int(got.headers[HEADER_LENGTH])
    head = json.loads(got.content[:size])
    image_out, fp32_out = head["outputs"]
    assert image_out["parameters"]["binary_data_size"] == 2 * 28 * 28
    image = np.frombuffer(got.content[size:], np.uint8).reshape(image_out["shape"])
    fp32 = np.array(fp32_out["data"], np.float32).reshape(fp32_out["shape"])
    first = expected_images(engine, "student", 2, 5, 1, 3)
    second = expected_images(engine, "student", 2, 40, 1, None)
    both = torch.cat([first, second])
    np.testing.assert_array_equal(image, to_uint8(both))
    np.testing.assert_allclose(fp32, both.clamp(-1, 1).numpy(), atol=1e-6)


def test_noise_input_equals_seed_input(oip_server):
    url, _ = oip_server
    noise = noise_for_seeds([9], (1, 28, 28)).numpy()
    with httpx.Client(base_url=url, timeout=60) as h:
        by_noise = h.post(INFER, json={"inputs": [
            {"name": "NOISE", "datatype": "FP32", "shape": [1, 1, 28, 28],
             "data": noise.tolist()}], "parameters": {"steps": 1}})
        by_seed = h.post(INFER, json={"inputs": [seed_input(9)], "parameters": {"steps": 1}})
    assert by_noise.status_code == by_seed.status_code == 200
    assert by_noise.json()["outputs"] == by_seed.json()["outputs"]


@pytest.mark.parametrize("body, needle", [
    ({"inputs": []}, "non-empty list"),
    ({"inputs": [seed_input(1)], "parameters": {"stesp": 2}}, "unknown parameters"),
    ({"inputs": [seed_input(1)], "parameters": {"model": "teacher", "steps": 65}}, "65"),
    ({"inputs": [seed_input(1)], "parameters": {"steps": True}}, "parameter steps"),
    ({"inputs": [{**seed_input(1), "datatype": "FP32"}]}, "expected INT64"),
    ({"inputs": [seed_input(*range(65))]}, "1..64"),
    ({"inputs": [seed_input(1), {"name": "LABEL", "datatype": "INT64", "shape": [1],
                                 "data": [10]}]}, "LABEL"),
    ({"inputs": [{**seed_input(1, 2), "shape": [3]}]}, "2 values for shape [3]"),
    ({"inputs": [seed_input(-1)]}, "seed"),
    ({"inputs": [seed_input(1)], "outputs": [{"name": "PNG"}]}, "unknown output"),
])
def test_bad_input_is_400_with_an_error(oip_server, body, needle):
    url, _ = oip_server
    with httpx.Client(base_url=url, timeout=60) as h:
        got = h.post(INFER, json=body)
    assert got.status_code == 400, got.text
    assert list(got.json()) == ["error"] and needle in got.json()["error"]


def test_unknown_model_is_404_and_refusals_are_counted(oip_server):
    url, _ = oip_server
    with httpx.Client(base_url=url, timeout=60) as h:
        before = metric_value(h.get("/metrics").text, "halfstep_rejected_total",
                              'reason="invalid"')
        missing = h.post("/v2/models/other/infer", json={"inputs": [seed_input(1)]})
        bad = h.post(INFER, content=b"{not json")
        after = h.get("/metrics").text
    assert missing.status_code == 404 and "unknown model 'other'" in missing.json()["error"]
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    assert metric_value(after, "halfstep_rejected_total", 'reason="invalid"') == before + 1
    assert metric_value(after, "halfstep_requests_total", 'status="404"') >= 1


def test_api_key_guards_all_but_health(tiny_bundle_dir):
    app, _ = make_oip_app(tiny_bundle_dir, api_key="s3cret")
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as h:
        assert h.get("/v2/health/ready").status_code == 200
        assert h.get("/v2/models/tiny").status_code == 401
        assert h.post(INFER, json={"inputs": [seed_input(1)]}).status_code == 401
        ok = h.post(INFER, json={"inputs": [seed_input(1)]},
                    headers={"Authorization": "Bearer s3cret"})
    assert ok.status_code == 200


def test_deadline_no_student_meets_is_503_with_retry_after(oip_server):
    url, _ = oip_server
    with httpx.Client(base_url=url, timeout=60) as h:
        got = h.post(INFER, json={"inputs": [seed_input(*range(64))],
                                  "parameters": {"deadline_ms": 1}})
    assert got.status_code == 503, got.text
    assert "deadline_ms=1" in got.json()["error"] and int(got.headers["retry-after"]) >= 1


def test_failed_batch_is_500_without_engine_details(oip_server):
    url, engine = oip_server
    engine.fail_steps = {1}
    try:
        with httpx.Client(base_url=url, timeout=60) as h:
            got = h.post(INFER, json={"inputs": [seed_input(1)], "parameters": {"steps": 1}})
    finally:
        engine.fail_steps = set()
    assert got.status_code == 500 and list(got.json()) == ["error"]
    assert "injected" not in got.text
