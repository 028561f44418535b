"""The /v2 routes with Triton's own Python HTTP client as the caller, on a real loopback
server: metadata, readiness, JSON and binary tensors, IMAGE_FP32, NOISE, and errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from halfstep.distill.images import to_uint8
from halfstep.distill.sampling import noise_for_seeds

from .test_oip_support import make_oip_app
from .test_server_support import expected_images, serving

httpclient = pytest.importorskip(
    "tritonclient.http", reason="needs tritonclient[http] (pip install 'tritonclient[http]')")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def triton(tiny_bundle_dir):
    app, engine = make_oip_app(tiny_bundle_dir)
    with serving(app) as url:
        client = httpclient.InferenceServerClient(url.removeprefix("http://"),
                                                  network_timeout=60.0)
        try:
            yield client, engine
        finally:
            client.close()


def tensor(name: str, array: np.ndarray, datatype: str, binary: bool = True):
    t = httpclient.InferInput(name, list(array.shape), datatype)
    t.set_data_from_numpy(array, binary_data=binary)
    return t


def test_metadata_and_readiness(triton):
    client, _ = triton
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and not client.is_model_ready("other")
    server = client.get_server_metadata()
    assert server["name"] == "halfstep" and "binary_tensor_data" in server["extensions"]
    model = client.get_model_metadata("tiny")
    assert [i["name"] for i in model["inputs"]] == ["SEED", "LABEL", "NOISE"]
    assert [(o["name"], o["shape"]) for o in model["outputs"]] == [
        ("IMAGE", [-1, 28, 28, 1]), ("IMAGE_FP32", [-1, 1, 28, 28])]


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_infer_seeds_and_labels(triton, binary):
    client, engine = triton
    inputs = [tensor("SEED", np.array([7, 8], np.int64), "INT64", binary),
              tensor("LABEL", np.array([2, 2], np.int64), "INT64", binary)]
    outputs = [httpclient.InferRequestedOutput("IMAGE", binary_data=binary)]
    result = client.infer("tiny", inputs, outputs=outputs, parameters={"steps": 3},
                          request_id="r1")
    response = result.get_response()
    assert response["id"] == "r1" and response["parameters"]["steps"] == 2
    want = to_uint8(expected_images(engine, "student", 2, 7, 2, 2))
    np.testing.assert_array_equal(result.as_numpy("IMAGE"), want)


def test_default_call_is_binary_and_image_fp32_on_request(triton):
    client, engine = triton
    seeds = tensor("SEED", np.array([3], np.int64), "INT64")
    plain = client.infer("tiny", [seeds])  # no outputs named: all binary, IMAGE only
    assert plain.get_output("IMAGE")["parameters"]["binary_data_size"] == 28 * 28
    assert plain.as_numpy("IMAGE_FP32") is None
    both = client.infer("tiny", [seeds], outputs=[
        httpclient.InferRequestedOutput("IMAGE"), httpclient.InferRequestedOutput("IMAGE_FP32")])
    want = expected_images(engine, "student", 8, 3, 1, None)
    np.testing.assert_allclose(both.as_numpy("IMAGE_FP32"), want.clamp(-1, 1).numpy(),
                               atol=1e-6)
    np.testing.assert_array_equal(both.as_numpy("IMAGE"), plain.as_numpy("IMAGE"))


def test_noise_input_and_teacher(triton):
    client, engine = triton
    noise = noise_for_seeds([21], (1, 28, 28)).numpy()
    result = client.infer("tiny", [tensor("NOISE", noise, "FP32")],
                          parameters={"model": "teacher", "steps": 3})
    assert result.get_response()["parameters"] == {"model": "teacher", "steps": 3,
                                                   "requested_steps": 3}
    want = engine.run("teacher", 3, torch.from_numpy(noise), torch.tensor([10]))
    np.testing.assert_array_equal(result.as_numpy("IMAGE"), to_uint8(want))


def test_errors_raise_with_the_message(triton):
    client, _ = triton
    seeds = tensor("SEED", np.array([1], np.int64), "INT64")
    with pytest.raises(InferenceServerException, match="unknown model 'other'"):
        client.infer("other", [seeds])
    with pytest.raises(InferenceServerException, match="expected INT64"):
        client.infer("tiny", [tensor("SEED", np.array([1], np.int32), "INT32")])
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.get_model_metadata("other")
