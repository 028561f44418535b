"""In-process side of `halfstep bench`: engines, the FLOP floor and the diffusers baseline."""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .engines import time_run


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({torch.get_num_threads()} torch threads)"


def engine_backends(bundle: Bundle) -> tuple[list[str], dict[str, str]]:
    """Backends this machine and bundle can run, and why each other one is skipped."""
    from halfstep.engines.factory import has_onnx_exports

    run, skipped = ["torch"], {}
    if importlib.util.find_spec("onnxruntime") is None:
        skipped["onnxruntime"] = "onnxruntime not installed"
    elif not has_onnx_exports(bundle):
        skipped["onnxruntime"] = f"no ONNX export in the bundle (halfstep export --bundle " \
                                 f"{bundle.root} --format onnx)"
    else:
        run.append("onnxruntime")
    if torch.cuda.is_available():
        run.append("cudagraph")
        if importlib.util.find_spec("tensorrt") is None:
            skipped["tensorrt"] = "tensorrt not installed"
        else:
            run.append("tensorrt")
    else:
        skipped["cudagraph"] = skipped["tensorrt"] = "no CUDA GPU"
    return run, skipped


def bench_engines(bundle: Bundle, steps_list: list[int], batches: list[int], repeats: int,
                  progress=print) -> tuple[list[dict], dict[str, str]]:
    """Median engine.run time per (backend, student steps, batch); skipped backends + why."""
    from halfstep.engines.factory import make_engine

    backends, skipped = engine_backends(bundle)
    rows = []
    for backend in backends:
        try:
            engine: Engine = make_engine(bundle, backend, buckets=tuple(sorted(set(batches))))
            engine.warmup([("student", s) for s in steps_list])
        except Exception as exc:  # e.g. a TensorRT engine that was never built
            skipped[backend] = f"{type(exc).__name__}: {exc}"
            continue
        for steps in steps_list:
            for batch in batches:
                progress(f"bench: engine {backend} student {steps} steps batch {batch}")
                with torch.inference_mode():
                    times = time_run(engine, "student", steps, batch, repeats)
                rows.append({"backend": backend, "steps": steps, "batch": batch,
                             "median_ms": round(1e3 * statistics.median(times), 3),
                             "repeats": repeats})
        del engine
    return rows, skipped


def denoiser_flops(bundle: Bundle, steps: int, batch: int) -> int:
    """FLOPs of one denoiser call at this batch (FlopCounterMode counts matmul/conv work)."""
    from torch.utils.flop_counter import FlopCounterMode

    den = bundle.denoiser("student", steps).eval()
    z = torch.randn(batch, *bundle.image_shape)
    labels = torch.zeros(batch, dtype=torch.int64)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        den(z, torch.full((batch,), 0.5), labels)
    return int(counter.get_total_flops())


def matmul_rate(size: int = 1024, seconds: float = 1.0) -> float:
    """Measured float32 matrix-multiply FLOP/s on this device (best of repeated runs)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    torch.mm(a, b)
    best, deadline = float("inf"), time.monotonic() + seconds
    while time.monotonic() < deadline:
        _sync()
        started = time.perf_counter()
        torch.mm(a, b)
        _sync()
        best = min(best, time.perf_counter() - started)
    return 2.0 * size ** 3 / best


def floor_rows(bundle: Bundle, engine_rows: list[dict], rate: float) -> list[dict]:
    """Achieved FLOP/s of each engine cell and its fraction of the measured matmul rate."""
    flops_cache: dict = {}
    rows = []
    for r in engine_rows:
        key = (r["steps"], r["batch"])
        if key not in flops_cache:
            flops_cache[key] = denoiser_flops(bundle, *key)
        total = flops_cache[key] * r["steps"]
        achieved = total / (r["median_ms"] / 1e3)
        rows.append({"backend": r["backend"], "steps": r["steps"], "batch": r["batch"],
                     "gflop": round(total / 1e9, 4), "achieved_gflops": round(achieved / 1e9, 2),
                     "matmul_gflops": round(rate / 1e9, 2),
                     "fraction": round(achieved / rate, 4)})
    return rows


def diffusers_sample(unet, scheduler, z: torch.Tensor, labels: torch.Tensor | None,
                     steps: int) -> torch.Tensor:
    """What a diffusers user writes: set_timesteps, then unet + scheduler.step per step."""
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        out = unet(z, t, class_labels=labels).sample
        z = scheduler.step(out, t, z).prev_sample
    return z


def bench_diffusers(bundle: Bundle, steps_list: list[int], repeats: int, batch: int = 1,
                    progress=print) -> list[dict]:
    """The peer baseline: the same student UNet weights under diffusers' DDIMScheduler
    (v-prediction, trailing spacing, squared-cosine betas), in process, median ms."""
    from diffusers import DDIMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for steps in steps_list:
        progress(f"bench: diffusers DDIMScheduler {steps} steps batch {batch}")
        unet = bundle.denoiser("student", steps).unet.to(device).eval()
        scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                                  prediction_type="v_prediction", timestep_spacing="trailing",
                                  clip_sample=True)
        gen = torch.Generator().manual_seed(0)
        z = torch.randn(batch, *bundle.image_shape, generator=gen).to(device)
        labels = torch.zeros(batch, dtype=torch.int64, device=device) \
            if bundle.num_labels else None
        times = []
        with torch.inference_mode():
            diffusers_sample(unet, scheduler, z, labels, steps)  # warm-up
            for _ in range(repeats):
                _sync()
                started = time.perf_counter()
                diffusers_sample(unet, scheduler, z, labels, steps).cpu()
                _sync()
                times.append(time.perf_counter() - started)
        rows.append({"steps": steps, "batch": batch,
                     "median_ms": round(1e3 * statistics.median(times), 3), "repeats": repeats})
    return rows
