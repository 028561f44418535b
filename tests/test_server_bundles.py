"""Several bundles in one server, and hot reload without dropping a request."""

from __future__ import annotations

import asyncio
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from halfstep.cli import build_parser
from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.images import to_uint8
from halfstep.engines.eager import TorchEngine
from halfstep.server.app import create_app
from halfstep.server.client import AsyncClient, Client, HalfstepError, wait_ready
from halfstep.server.deployments import BundleSpec
from halfstep.server.settings import Settings

from .conftest import build_tiny_bundle
from .test_server_support import expected_images, free_socket, metric_value, serving

KEY = "s3cret"


def png_array(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def want(bundle_dir, steps: int, seed: int) -> np.ndarray:
    """The 1-image PNG pixels the server must return for this bundle, student and seed."""
    engine = TorchEngine(Bundle(bundle_dir), buckets=(4, 8))
    return to_uint8(expected_images(engine, "student", steps, seed, 1, None))[0, ..., 0]


@pytest.fixture(scope="module")
def two_bundles(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundles")
    return (build_tiny_bundle(root / "a", name="alpha", seed=0),
            build_tiny_bundle(root / "b", name="beta", seed=100))


def settings(*specs: str, **kw) -> Settings:
    return Settings(bundles=specs, backend="torch", max_batch=8, max_wait_ms=5.0, **kw)


# -- configuration ----------------------------------------------------------------------------

def test_bundle_specs_parse_names_and_paths():
    assert BundleSpec.parse("mnist=/models/a") == BundleSpec("mnist", "/models/a")
    assert BundleSpec.parse("/models/a") == BundleSpec(None, "/models/a")
    assert BundleSpec.parse("/data/x=y") == BundleSpec(None, "/data/x=y")  # '=' inside a path
    assert BundleSpec.parse(None) == BundleSpec(None, None)  # the embedded bundle
    with pytest.raises(ValueError, match="not valid"):
        BundleSpec.parse("bad name=/a")
    with pytest.raises(ValueError, match="has no directory"):
        BundleSpec.parse("mnist=")


def test_settings_read_several_bundles_from_env_and_flags():
    env = {"HALFSTEP_BUNDLES": "a=/x, b=/y"}
    assert Settings.from_env(env).bundle_specs() == ("a=/x", "b=/y")
    assert Settings.from_env({"HALFSTEP_BUNDLE": "/one"}).bundle_specs() == ("/one",)
    assert Settings.from_env({}).bundle_specs() == ()
    # flags replace both variables
    both = {**env, "HALFSTEP_BUNDLE": "/one"}
    assert Settings.from_env(both, bundles=("c=/z",)).bundle_specs() == ("c=/z",)
    with pytest.raises(ValueError, match="not both"):
        Settings.from_env(both)
    args = build_parser().parse_args(
        ["serve", "--bundle", "a=/x", "--bundle", "/y"])
    assert args.bundle == ["a=/x", "/y"]


def test_two_bundles_need_two_names(two_bundles):
    a, _ = two_bundles
    with pytest.raises(BundleError, match="two bundles are named 'alpha'"):
        create_app(settings(str(a), str(a)))


# -- serving several --------------------------------------------------------------------------

def test_each_bundle_serves_its_own_weights_lanes_and_metrics(two_bundles):
    a, b = two_bundles
    app = create_app(settings(f"first={a}", str(b)))
    with serving(app) as url, Client(url) as c:
        info = c.models()
        default = c.generate(steps=2, seed=3)
        other = c.generate(steps=2, seed=3, bundle="beta")
        named = c.generate(steps=2, seed=3, bundle="first")
        unknown = c.http.post("/generate", params={"bundle": "gamma"})
        oip = c.http.get("/v2/models/beta").json()
        inferred = c.http.post("/v2/models/beta/infer", json={
            "inputs": [{"name": "SEED", "datatype": "INT64", "shape": [1], "data": [3]}],
            "parameters": {"steps": 2}})
        index = c.http.post("/v2/repository/index").json()
        text = c.metrics()
    assert info["default"] == "first" and info["name"] == "first"
    assert [x["name"] for x in info["bundles"]] == ["first", "beta"]
    assert set(info["bundles"][1]["lanes"]) >= {"student:1", "student:2"}
    assert info["bundles"][0]["sha256"] != info["bundles"][1]["sha256"]
    np.testing.assert_array_equal(png_array(default.content), want(a, 2, 3))
    np.testing.assert_array_equal(png_array(other.content), want(b, 2, 3))
    np.testing.assert_array_equal(png_array(named.content), want(a, 2, 3))
    assert not np.array_equal(png_array(default.content), png_array(other.content))
    assert other.headers["x-halfstep-bundle"] == "beta"
    assert unknown.status_code == 422 and "first" in unknown.text and "beta" in unknown.text
    assert oip["name"] == "beta" and oip["inputs"][2]["shape"] == [-1, 1, 28, 28]
    assert inferred.status_code == 200 and inferred.headers["x-halfstep-bundle"] == "beta"
    image = inferred.json()["outputs"][0]
    np.testing.assert_array_equal(np.array(image["data"], dtype=np.uint8).reshape(28, 28),
                                  want(b, 2, 3))
    assert [(m["name"], m["state"]) for m in index] == [("first", "READY"), ("beta", "READY")]
    for bundle in ("first", "beta"):
        labels = f'bundle="{bundle}",model="student",status="200",steps="2"'
        assert metric_value(text, "halfstep_request_duration_seconds_count", labels) >= 1
        assert metric_value(text, "halfstep_bundle_generation", f'bundle="{bundle}"') == 1
        assert f'halfstep_reloads_total{{bundle="{bundle}",result="swapped"}} 0.0' in text
    assert metric_value(text, "halfstep_images_generated_total",
                        'bundle="first",model="student"') == 2


# -- reload -----------------------------------------------------------------------------------

def swap_weights(target, source) -> None:
    """Make bundle directory `target` hold `source`'s weights (its name stays the same)."""
    for path in source.iterdir():
        if path.name != "bundle.json":
            shutil.copy2(path, target / path.name)
    manifest = (source / "bundle.json").read_text()
    (target / "bundle.json").write_text(manifest)


@pytest.fixture
def served_dir(two_bundles, tmp_path):
    a, _ = two_bundles
    return shutil.copytree(a, tmp_path / "served")


def test_reload_needs_the_api_key_and_reports_unchanged(served_dir):
    app = create_app(settings(f"m={served_dir}"))
    with serving(app) as url:
        off = httpx.post(f"{url}/admin/reload")
    assert off.status_code == 403 and "HALFSTEP_API_KEY" in off.json()["error"]

    app = create_app(settings(f"m={served_dir}", api_key=KEY))
    with serving(app) as url, Client(url, api_key=KEY) as c:
        anonymous = httpx.post(f"{url}/admin/reload")
        assert c.reload()["m"] == {"result": "unchanged", "generation": 1,
                                   "sha256": c.models()["sha256"]}
    assert anonymous.status_code == 401


def test_a_bad_bundle_is_refused_and_the_old_one_keeps_serving(two_bundles, served_dir,
                                                               tmp_path):
    a, b = two_bundles
    app = create_app(settings(f"m={served_dir}", api_key=KEY))
    with serving(app) as url, Client(url, api_key=KEY) as c:
        swap_weights(served_dir, b)
        weights = next(p for p in served_dir.iterdir() if p.name.startswith("student"))
        weights.write_bytes(weights.read_bytes()[:-8] + b"corrupt!")  # sha256 no longer matches
        with pytest.raises(HalfstepError) as refused:
            c.reload()
        after = c.generate(steps=2, seed=7)
        text = c.metrics()
    assert refused.value.status == 409
    outcome = refused.value.body["bundles"]["m"]
    assert outcome["result"] == "refused" and "sha256" in outcome["reason"]
    assert outcome["generation"] == 1
    np.testing.assert_array_equal(png_array(after.content), want(a, 2, 7))  # the old weights
    assert metric_value(text, "halfstep_reloads_total", 'bundle="m",result="refused"') == 1


def test_a_bundle_of_another_shape_is_refused(served_dir, tmp_path):
    app = create_app(settings(f"m={served_dir}", api_key=KEY))
    with serving(app) as url, Client(url, api_key=KEY) as c:
        shutil.rmtree(served_dir)
        build_tiny_bundle(served_dir, steps=(1,), name="rgb", channels=3)
        with pytest.raises(HalfstepError) as refused:
            c.reload()
    assert "image shape changed" in refused.value.body["bundles"]["m"]["reason"]


def test_reload_under_load_drops_nothing_and_switches_weights(two_bundles, served_dir):
    """8 closed-loop clients across a reload that swaps every student: every request gets 200,
    those before the swap carry the old weights, those after it the new ones."""
    a, b = two_bundles
    old, new = want(a, 4, 11), want(b, 4, 11)
    app = create_app(settings(f"m={served_dir}", api_key=KEY, max_queue=64))
    with serving(app) as url:
        swap_weights(served_dir, b)
        results, outcome = asyncio.run(_load_across_reload(url))
        with Client(url, api_key=KEY) as c:
            generation = c.models()["generation"]
    statuses = [status for status, _, _ in results]
    assert statuses.count(200) == len(statuses) and len(statuses) >= 40
    assert outcome["m"]["result"] == "swapped" and generation == 2
    kinds = []
    for _, pixels, after_swap in results:
        kind = "old" if np.array_equal(pixels, old) else "new" if np.array_equal(pixels, new) \
            else "neither"
        kinds.append(kind)
        if after_swap:
            assert kind == "new"  # sent after the swap answered: never the old weights
    assert "neither" not in kinds and "old" in kinds and "new" in kinds
    assert kinds.index("new") > 0 and "old" not in kinds[kinds.index("new") + 8:]


async def _load_across_reload(url: str):
    results: list[tuple[int, np.ndarray | None, bool]] = []
    swapped = threading.Event()
    stop = asyncio.Event()

    async def client(c: AsyncClient) -> None:
        while not stop.is_set():
            after = swapped.is_set()
            r = await c.http.post("/generate", params={"steps": 4, "seed": 11})
            pixels = png_array(r.content) if r.status_code == 200 else None
            results.append((r.status_code, pixels, after))

    async with AsyncClient(url, api_key=KEY) as c:
        load = [asyncio.create_task(client(c)) for _ in range(8)]
        while len(results) < 16:
            await asyncio.sleep(0.01)
        outcome = await c.reload()
        swapped.set()
        count = len(results)
        while len(results) < count + 24:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.gather(*load)
    return results, outcome


def test_sighup_reloads_a_running_serve_process(two_bundles, served_dir, tmp_path):
    """`halfstep serve` with two bundles (both from HALFSTEP_BUNDLES): SIGHUP swaps in the
    changed one and logs it; the other is unchanged."""
    a, b = two_bundles
    root = Path(__file__).resolve().parents[1]
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(root), "HALFSTEP_CACHE": str(tmp_path),
           "HALFSTEP_BUNDLES": f"m={served_dir},other={a}"}
    env.pop("HALFSTEP_API_KEY", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "halfstep", "serve", "--backend", "torch", "--max-batch", "8",
         "--port", str(port)], cwd=root, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, 120)
        swap_weights(served_dir, b)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        while httpx.get(f"{url}/v1/models").json()["generation"] != 2:
            assert time.monotonic() < deadline and proc.poll() is None, "no reload"
            time.sleep(0.2)
        pixels = png_array(httpx.post(f"{url}/generate", params={"steps": 2, "seed": 9}).content)
        bundles = httpx.get(f"{url}/v1/models").json()["bundles"]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    np.testing.assert_array_equal(pixels, want(b, 2, 9))
    assert [(x["name"], x["generation"]) for x in bundles] == [("m", 2), ("other", 1)]
    assert "reload (SIGHUP) of bundle m: swapped" in err
    assert "reload (SIGHUP) of bundle other: unchanged" in err
    assert "serving bundle m (default)" in out and "serving bundle other from" in out


def test_a_swap_restarts_the_lane_estimates_and_refusals_count_under_their_bundle(
        two_bundles, served_dir):
    a, b = two_bundles
    app = create_app(settings(str(a), f"m={served_dir}", api_key=KEY, max_teacher_steps=4))
    state = app.state.halfstep
    with serving(app) as url, Client(url, api_key=KEY) as c:
        c.generate(steps=2, bundle="m")
        lane = state.batcher.lane(("m", "student", 2))
        lane.image_step_s = 123.0  # as if measured on the old weights
        swap_weights(served_dir, b)
        assert c.reload()["m"]["result"] == "swapped"
        refused = c.http.post("/generate", params={"bundle": "m", "model": "teacher",
                                                   "steps": 8})
        text = c.metrics()
    assert lane.image_step_s != 123.0 and lane.image_step_s < 1.0  # from the new warm-up
    assert refused.status_code == 422
    labels = 'bundle="m",model="teacher",status="422",steps="teacher"'
    assert metric_value(text, "halfstep_request_duration_seconds_count", labels) == 1


def test_a_model_is_ready_once_its_own_bundle_is_warm(two_bundles):
    from types import SimpleNamespace

    a, b = two_bundles
    state = create_app(settings(str(a), str(b))).state.halfstep
    state.batcher = SimpleNamespace(closing=False, failure=None)  # started, not serving here
    alpha, beta = state.deployments["alpha"], state.deployments["beta"]
    alpha.warmup, alpha.ready = {"warmup_s": 1.0}, True  # beta still warming up
    assert state.not_ready_reason(alpha) is None
    assert state.not_ready_reason(beta) == "warming up"
    assert state.not_ready_reason() == "warming up"  # the server: once all are warm
    beta.warmup = "EngineError: boom"
    assert "failed" in state.not_ready_reason(beta) and state.not_ready_reason(alpha) is None
