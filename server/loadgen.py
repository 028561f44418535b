"""Serving-overhead measurement, reused by the benchmark: HTTP vs. the in-process engine.

Targets (issue 5): HTTP p50 for steps=4, n=1 <= 1.2x the in-process engine time on the same
backend; with 32 concurrent clients, images/s >= 0.8x the engine's best batched throughput.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
from halfstep.distill.bundle import Bundle

from .client import AsyncClient, Client, HalfstepError
from .settings import batch_buckets


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def engine_numbers(bundle: Bundle, backend: str, steps: int, max_batch: int,
                   repeats: int = 20) -> dict:
    """In-process engine: p50 for one image, and the best images/s over the buckets."""
    from halfstep.export.backends import make_engine

    engine = make_engine(bundle, backend, buckets=batch_buckets(max_batch))
    engine.warmup([("student", steps)])
    shape, k = bundle.image_shape, bundle.num_labels

    def run(b: int):
        return lambda: engine.run("student", steps, torch.randn(b, *shape),
                                  torch.full((b,), k, dtype=torch.int64))

    single = statistics.median(_timed(run(1), repeats))
    per_bucket = {b: b / statistics.median(_timed(run(b), max(3, repeats // 4)))
                  for b in engine.used_buckets()}
    return {"engine_p50_s": single, "engine_best_images_per_s": max(per_bucket.values()),
            "engine_images_per_s_by_bucket": per_bucket, "backend": engine.name}


async def _closed_loop(url: str, steps: int, clients: int,
                       duration_s: float) -> tuple[int, dict]:
    import httpx

    done, errors = 0, {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with AsyncClient(url, limits=limits, timeout=120) as ac:
        stop = time.monotonic() + duration_s

        async def worker(i: int):
            nonlocal done
            seed = i * 1_000_000
            while time.monotonic() < stop:
                try:
                    await ac.generate(steps=steps, seed=seed)
                    done += 1
                except HalfstepError as exc:  # 503/504 under overload: count, keep going
                    errors[exc.status] = errors.get(exc.status, 0) + 1
                seed += 1

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return done, errors


def http_numbers(url: str, steps: int, clients: int = 32, repeats: int = 30,
                 duration_s: float = 10.0) -> dict:
    """Sequential p50 for one image, then closed-loop images/s with `clients` clients."""
    with Client(url, timeout=120) as c:
        c.generate(steps=steps, seed=0)
        p50 = statistics.median(_timed(lambda: c.generate(steps=steps, seed=1), repeats))
    t0 = time.perf_counter()
    images, errors = asyncio.run(_closed_loop(url, steps, clients, duration_s))
    return {"http_p50_s": p50, "http_images_per_s": images / (time.perf_counter() - t0),
            "clients": clients, "http_errors_by_status": errors}


def measure(bundle_dir: str, backend: str = "torch", steps: int = 4, max_batch: int = 32,
            clients: int = 32, duration_s: float = 10.0, repeats: int = 30) -> dict:
    """Engine in-process, then `halfstep serve` in a subprocess on loopback; both targets."""
    eng = engine_numbers(Bundle(bundle_dir), backend, steps, max_batch, repeats)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "halfstep", "serve", "--bundle", str(bundle_dir), "--backend",
           backend, "--host", "127.0.0.1", "--port", str(port), "--max-batch", str(max_batch)]
    env = {k: v for k, v in os.environ.items() if k != "HALFSTEP_API_KEY"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url) as c:
            c.wait_ready(900)
        http = http_numbers(url, steps, clients, repeats, duration_s)
    finally:
        proc.terminate()
        proc.wait(timeout=120)
    return {**eng, **http, "steps": steps, "max_batch": max_batch,
            "latency_ratio": http["http_p50_s"] / eng["engine_p50_s"],
            "throughput_ratio": http["http_images_per_s"] / eng["engine_best_images_per_s"]}
