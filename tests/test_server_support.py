"""Helpers for the server tests: an instrumented engine, a real uvicorn on loopback, tiny bundles.

The engine is the real TorchEngine; the wrapper only records calls and can hold a batch at a
gate (to build queues deterministically), fail, or return too few images on request.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from halfstep.distill.bundle import Bundle, add_student, create_bundle
from halfstep.engines.eager import TorchEngine
from halfstep.server.app import create_app
from halfstep.server.client import Client
from halfstep.server.settings import Settings

from .conftest import tiny_denoiser


class InstrumentedEngine(TorchEngine):
    """TorchEngine that records (model, steps, n) per run and can be held, failed or shorted."""

    name = "torch"

    def __init__(self, bundle: Bundle, buckets=(4, 8), warm_keys=None) -> None:
        super().__init__(bundle, "cpu", buckets)
        self.calls: list[tuple[str, int, int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()  # set when a run reaches the gate
        self.fail_steps: set[int] = set()
        self.short_steps: set[int] = set()
        # one cheap key keeps start-up fast; the full warm-up is the engine's own business
        self.warm_keys = warm_keys or [("student", bundle.student_steps[0])]

    def _enter(self, model: str, steps: int, rows: int, record: bool = True) -> None:
        """Wait at the gate, record the run, and fail it when asked to."""
        self.entered.set()
        if not self.gate.wait(timeout=30):
            raise RuntimeError("test gate never opened")
        if record:
            self.calls.append((model, steps, rows))
        if steps in self.fail_steps:
            raise RuntimeError(f"injected failure for steps={steps}")

    def run(self, model, steps, noise, labels):
        self._enter(model, steps, int(noise.shape[0]))
        images = super().run(model, steps, noise, labels)
        return images[:-1] if steps in self.short_steps else images

    def run_chunk(self, model, steps, z, labels, start, stop):
        """A teacher of more than chunk_steps steps runs here: gated at every chunk, recorded
        once (as run() records it) at its first."""
        self._enter(model, steps, int(z.shape[0]), record=start == 0)
        out = super().run_chunk(model, steps, z, labels, start, stop)
        return out[:-1] if stop == steps and steps in self.short_steps else out

    def warmup(self, keys=None):
        info = super().warmup(self.warm_keys)
        self.calls.clear()
        return info

    @contextlib.contextmanager
    def held(self):
        """Block the engine thread in its next run until the block exits."""
        self.entered.clear()
        self.gate.clear()
        try:
            yield
        finally:
            self.gate.set()


def micro_bundle(root: Path, steps=(1, 2, 4), image_size: int = 8, max_steps: int = 16) -> Path:
    """An even smaller bundle (8x8 images) for tests that run many requests (fuzzing)."""
    cfg = dict(image_size=image_size, block_out_channels=(8, 8))
    teacher = tiny_denoiser(0, **cfg)
    create_bundle(root, "micro", teacher.config, teacher.unet.state_dict(), default_steps=4,
                  max_steps=max_steps, configs={"note": "random weights for tests"})
    for i, n in enumerate(steps):
        add_student(root, n, tiny_denoiser(i + 1, **cfg).unet.state_dict(), {})
    return root


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))  # tests bind loopback only
    return sock


@contextlib.contextmanager
def serving(app, ready: bool = True):
    """Run `app` under uvicorn in a thread on 127.0.0.1:<free port>; yields the base URL."""
    sock = free_socket()
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        if ready:
            with Client(url) as c:
                c.wait_ready(120)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        sock.close()


def make_app(bundle_dir: Path, engine: InstrumentedEngine | None = None, **settings):
    """An app over an InstrumentedEngine (returned too) with small, test-sized settings."""
    engine = engine or InstrumentedEngine(Bundle(bundle_dir))
    base = dict(bundle=str(bundle_dir), backend="torch", max_batch=8, max_wait_ms=20.0)
    return create_app(Settings(**{**base, **settings}), engine=engine), engine


def lane_of(app, steps: int):
    """The scheduler lane of the app's default bundle's student with `steps` steps."""
    state = app.state.halfstep
    return state.batcher.lane((state.default, "student", steps))


def metric_value(text: str, name: str, labels: str = "") -> float:
    """The value of one sample in Prometheus text, e.g. ("halfstep_rejected_total",
    'reason="deadline"'); 0 when absent."""
    for line in text.splitlines():
        head, _, value = line.rpartition(" ")
        if head == (f"{name}{{{labels}}}" if labels else name):
            return float(value)
    return 0.0


def expected_images(engine: TorchEngine, model: str, steps: int, seed: int, n: int,
                    label: int | None) -> torch.Tensor:
    """What the server must return: the same engine, run in-process on the request's seeds."""
    from halfstep.distill.sample import request_seeds
    from halfstep.distill.sampling import noise_for_seeds

    k = engine.bundle.num_labels
    noise = noise_for_seeds(request_seeds(seed, n), engine.bundle.image_shape)
    labels = torch.full((n,), k if label is None else label, dtype=torch.int64)
    step = engine.max_batch or n
    return torch.cat([TorchEngine.run(engine, model, steps, noise[i:i + step], labels[i:i + step])
                      for i in range(0, n, step)])


@pytest.fixture(scope="session")
def micro_bundle_dir(tmp_path_factory) -> Path:
    return micro_bundle(tmp_path_factory.mktemp("micro") / "micro")


def call(app, method: str, path: str, headers: dict | None = None, **kw) -> httpx.Response:
    """One request through the ASGI transport (no lifespan: nothing is queued or warmed up)."""

    async def go():
        transport = httpx.ASGITransport(app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
            return await c.request(method, path, headers=headers, **kw)

    return asyncio.run(go())
