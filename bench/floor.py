"""In-process side of `halfstep bench`: which engines run here, the FLOP floor, the diffusers
baseline (the engines themselves are timed by bench/engines.py)."""

from __future__ import annotations

import importlib.util
import statistics
import time

import torch

from halfstep.distill.bundle import Bundle

from .engines import time_calls


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
        best = min(best, *time_calls(lambda: torch.mm(a, b), repeats=1, warmup_runs=0))
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
    rows = []
    for steps in steps_list:
        progress(f"bench: diffusers DDIMScheduler {steps} steps batch {batch}")
        times = time_diffusers(bundle, steps, batch, repeats)
        rows.append({"steps": steps, "batch": batch,
                     "median_ms": round(1e3 * statistics.median(times), 3), "repeats": repeats})
    return rows


def time_diffusers(bundle: Bundle, steps: int, batch: int, repeats: int) -> list[float]:
    """Seconds per `diffusers_sample` of the student's UNet (CPU images out), after a warm-up."""
    from diffusers import DDIMScheduler

    device = "cuda" if torch.cuda.is_available() else "cpu"
    unet = bundle.denoiser("student", steps).unet.to(device).eval()
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", timestep_spacing="trailing",
                              clip_sample=True)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(batch, *bundle.image_shape, generator=gen).to(device)
    labels = torch.zeros(batch, dtype=torch.int64, device=device) if bundle.num_labels else None
    with torch.inference_mode():
        return time_calls(lambda: diffusers_sample(unet, scheduler, z, labels, steps).cpu(),
                          repeats)
