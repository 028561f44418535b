"""The encode stage of /generate: a job's images -> one PNG (a grid for n > 1) or JSON.

It takes plain images and timings, so encoding does not depend on how the images were made.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING

import torch
from fastapi.responses import JSONResponse, Response

from halfstep.distill.images import grid_shape, make_grid, png_bytes, to_uint8
from halfstep.distill.sample import request_seeds

from .request import GenerateJob

if TYPE_CHECKING:
    from halfstep.engines.base import Engine


def _encode(job: GenerateJob, images: torch.Tensor) -> bytes | list[bytes]:
    pixels = to_uint8(images)
    if job.fmt == "png":
        return png_bytes(make_grid(pixels))
    return [png_bytes(p) for p in pixels]


async def encode_response(job: GenerateJob, images: torch.Tensor, *, backend: str,
                          queue_s: float, run_s: float, started: float) -> Response:
    """The answer to `job`: `images` ([n, C, H, W] in [-1, 1]) as PNG or JSON, with headers
    saying the steps, seed, model and backend used and the time spent queued, running and
    encoding (`started` is the request's arrival, a `time.perf_counter()` reading)."""
    t0 = time.perf_counter()
    encoded = _encode(job, images)  # the caller runs this off the server's loop
    encode_s = time.perf_counter() - t0
    headers = {
        "X-Halfstep-Steps": str(job.steps), "X-Halfstep-Seed": str(job.seed),
        "X-Halfstep-Model": job.model, "X-Halfstep-Backend": backend,
        "Server-Timing": f"queue;dur={queue_s * 1e3:.2f}, run;dur={run_s * 1e3:.2f}"
                         f", encode;dur={encode_s * 1e3:.2f}",
    }
    if job.fmt == "png":
        rows, cols = grid_shape(job.n)
        headers["X-Halfstep-Grid"] = f"{rows}x{cols}"
        return Response(encoded, media_type="image/png", headers=headers)
    seeds = request_seeds(job.seed, job.n)
    return JSONResponse({
        "model": job.model, "steps": job.steps, "requested_steps": job.requested,
        "n": job.n, "seed": job.seed, "label": job.label, "backend": backend,
        "images": [{"seed": s, "png": base64.b64encode(b).decode()}
                   for s, b in zip(seeds, encoded, strict=True)],
        "timings": {"queue_s": round(queue_s, 6), "run_s": round(run_s, 6),
                    "encode_s": round(encode_s, 6),
                    "total_s": round(time.perf_counter() - started, 6)},
    }, headers=headers)


def backend_for(engine: Engine, model: str) -> str:
    """The backend that runs `model` on `engine`: a TeacherFallback (ONNX Runtime, TensorRT)
    runs its students compiled but the teacher on its eager `teacher` engine."""
    teacher = getattr(engine, "teacher", None)
    return teacher.name if model == "teacher" and teacher is not None else engine.name

