"""The decode and encode stages of /generate: parameters -> a validated job -> PNG or JSON.

Kept apart from the routes (app.py) so each file reads in one sitting (docs/STYLE.md 9, 11).
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from dataclasses import dataclass

import torch
from fastapi.responses import JSONResponse, Response
from pydantic import ConfigDict, Field, create_model

from halfstep.distill.bundle import Bundle, BundleError
from halfstep.distill.images import grid_shape, make_grid, png_bytes, to_uint8
from halfstep.distill.sample import request_seeds
from halfstep.distill.sampling import noise_for_seeds

from .batcher import Result

MAX_N = 64
MAX_SEED = 2**63 - 1
MAX_BUDGET = 1_000_000
RANDOM_SEEDS = 2**32  # absent seed: drawn below this, so it survives JavaScript numbers
STEPS_DOC = ("student: your step budget; the largest distilled student with steps <= budget "
             "runs (default: the largest student). teacher: exact steps (default: the "
             "bundle's teacher default)")
GENERATE_DOC = """Parameters come in the query or, equally, as a JSON body (not both for one field).

* Image i of a request with seed s uses seed s + i; the same (model, steps, seed, label, n) on
  the same backend gives identical bytes whatever else shares the batch.
* `format=png`: one PNG. For n > 1 a grid: cols = ceil(sqrt(n)), rows = ceil(n / cols),
  filled row-major (image i at row i // cols, column i % cols), no padding, unused cells black;
  the header `X-Halfstep-Grid` says `ROWSxCOLS`.
* `format=json`: `images` is a list of `{seed, png}` (base64), with `model`, `steps`,
  `requested_steps`, `label` and `timings` (queue_s, run_s, encode_s, total_s).
* Headers: `X-Halfstep-Steps` (steps used), `X-Halfstep-Seed`, `X-Halfstep-Model`,
  `Server-Timing` (queue, run, encode in ms).
* Errors: 4xx with `{"error": ..., "allowed": ...}`; 503 + Retry-After when the queue is full;
  504 when the request waited past its deadline (it never ran); 500 if its batch failed.
"""


class InvalidRequest(ValueError):
    """A parameter that is wrong for this bundle: answered 422 with what is allowed."""


def params_model(num_labels: int):
    """The JSON body's schema: the query's fields with the same bounds, nothing else."""
    opt = lambda **kw: Field(None, **kw)
    return create_model(
        "GenerateBody",
        __config__=ConfigDict(extra="forbid"),
        steps=(int | None, opt(ge=1, le=MAX_BUDGET)),
        model=(str | None, opt(pattern="^(student|teacher)$")),
        n=(int | None, opt(ge=1, le=MAX_N)),
        seed=(int | None, opt(ge=0, le=MAX_SEED)),
        label=(int | None, opt(ge=0, le=max(num_labels - 1, 0))),
        format=(str | None, opt(pattern="^(png|json)$")),
    )


def merge(query: dict, body) -> dict:
    """Query and body fields together; a field given in both is an error."""
    from_body = body.model_dump(exclude_none=True) if body is not None else {}
    twice = sorted(k for k, v in query.items() if v is not None and k in from_body)
    if twice:
        raise InvalidRequest(f"{', '.join(twice)} given both in the query and in the body; "
                             "send each field once")
    return {**{k: v for k, v in query.items() if v is not None}, **from_body}


@dataclass
class GenerateJob:
    model: str
    steps: int  # steps that run
    requested: int | None
    n: int
    seed: int
    label: int | None
    fmt: str
    noise: torch.Tensor
    labels: torch.Tensor


def prepare(p: dict, bundle: Bundle) -> GenerateJob:
    """Resolve the step budget, check the label, and draw each image's noise from its seed."""
    model, fmt = p.get("model", "student"), p.get("format", "png")
    n, label, requested = p.get("n", 1), p.get("label"), p.get("steps")
    seed = p["seed"] if p.get("seed") is not None else secrets.randbelow(RANDOM_SEEDS)
    try:
        if model == "student":
            if not bundle.student_steps:
                raise InvalidRequest(f"bundle {bundle.name} has no students; use model=teacher")
            steps = bundle.student_for_budget(
                requested if requested is not None else bundle.student_steps[-1])
        else:
            steps = requested if requested is not None else bundle.teacher_default_steps
            bundle.check_steps("teacher", steps)
    except BundleError as exc:
        raise InvalidRequest(str(exc)) from None
    k = bundle.num_labels
    if label is not None and not 0 <= label < k:
        raise InvalidRequest(f"label={label} is out of range; allowed: 0..{k - 1} or absent"
                             if k else "this bundle is unconditional: omit label")
    noise = noise_for_seeds(request_seeds(seed, n), bundle.image_shape)
    labels = torch.full((n,), k if label is None else label, dtype=torch.int64)
    return GenerateJob(model, steps, requested, n, seed, label, fmt, noise, labels)


def _encode(job: GenerateJob, images: torch.Tensor) -> bytes | list[bytes]:
    pixels = to_uint8(images)
    if job.fmt == "png":
        return png_bytes(make_grid(pixels))
    return [png_bytes(p) for p in pixels]


async def encode_response(job: GenerateJob, result: Result, backend: str,
                          started: float) -> Response:
    t0 = time.perf_counter()
    if job.n * result.images[0].numel() > 16_384:  # big encodes leave the event loop free
        encoded = await asyncio.to_thread(_encode, job, result.images)
    else:
        encoded = _encode(job, result.images)
    encode_s = time.perf_counter() - t0
    headers = {
        "X-Halfstep-Steps": str(job.steps), "X-Halfstep-Seed": str(job.seed),
        "X-Halfstep-Model": job.model, "X-Halfstep-Backend": backend,
        "Server-Timing": f"queue;dur={result.queue_s * 1e3:.2f}, run;dur={result.run_s * 1e3:.2f}"
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
        "timings": {"queue_s": round(result.queue_s, 6), "run_s": round(result.run_s, 6),
                    "encode_s": round(encode_s, 6),
                    "total_s": round(time.perf_counter() - started, 6)},
    }, headers=headers)
