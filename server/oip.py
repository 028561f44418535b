"""The Open Inference Protocol (v2, the KServe / Triton REST protocol) beside /generate.

One model per served bundle, named as the bundle is served (`POST /v2/repository/index` lists
them, Triton's model repository extension). Inputs: SEED INT64 [n] (image i from seed SEED[i],
the noise /generate draws for that seed) or NOISE FP32 [n, C, H, W] (the caller's own starting
noise), and LABEL INT64 [n] (optional; -1 or absent: unconditional). Request parameters: `steps`
(student: a budget, the largest student within it runs; teacher: exact), `model` (student or
teacher), `deadline_ms`. Outputs: IMAGE UINT8 [n, H, W, C] (the default) and IMAGE_FP32 FP32
[n, C, H, W] in [-1, 1]; the response parameters say the model and steps that ran. Inference
goes through the same admission checks, batcher, metrics and refusals as /generate; errors
answer `{"error": ...}` (400 bad input or over a limit, 404 unknown model, 503 not ready or
overloaded, 504 deadline). The binary tensor data extension is supported both ways. When
HALFSTEP_API_KEY is set, the app's bearer-token middleware guards all of /v2 but the two
health routes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

import halfstep
from halfstep.distill.bundle import Bundle
from halfstep.distill.images import to_uint8
from halfstep.distill.sampling import noise_for_seeds

from .admission import check_ready
from .errors import REFUSALS, reject
from .oip_tensors import (
    HEADER_LENGTH,
    OutputRequest,
    read_inputs,
    requested_outputs,
    response_body,
    split_body,
)
from .request import (
    MAX_BUDGET,
    MAX_DEADLINE_MS,
    MAX_N,
    MAX_SEED,
    GenerateJob,
    InvalidRequest,
    prepare,
)
from .routes import record_request, run_job
from .state import ServerState

VERSION = "1"
PLATFORM = "halfstep"
INPUTS = {"SEED": "INT64", "LABEL": "INT64", "NOISE": "FP32"}
OUTPUTS = {"IMAGE": "UINT8", "IMAGE_FP32": "FP32"}
PARAMETERS = ("steps", "model", "deadline_ms", "binary_data_output")
# sent by Triton's clients on their own; accepted and ignored
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "sequence_id", "sequence_start",
                                "sequence_end"})

router = APIRouter(prefix="/v2", tags=["Open Inference Protocol (v2)"])


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers)


def refusal(request: Request, exc: Exception) -> JSONResponse:
    """A refusal answered and counted by /generate's own `reject`, reshaped for the protocol:
    400 (not 422) for bad input, and only the "error" key."""
    answer = reject(request, exc)
    message = json.loads(answer.body)["error"]
    headers = {k.lower(): v for k, v in answer.headers.items()
               if k.lower() not in ("content-length", "content-type")}
    status = 400 if answer.status_code == 422 else answer.status_code
    return error(status, message, headers)


def unknown_model(state: ServerState, name: str, version: str | None) -> JSONResponse | None:
    if name not in state.deployments:
        return error(404, f"unknown model {name!r}; this server serves "
                          f"{', '.join(map(repr, state.deployments))}")
    if version not in (None, "", VERSION):
        return error(404, f"model {name!r} has no version {version!r}; versions: {VERSION}")
    return None


@router.get("", summary="Server metadata", response_model=None)
async def server_metadata() -> dict:
    return {"name": "halfstep", "version": halfstep.__version__,
            "extensions": ["binary_tensor_data"]}


@router.get("/health/live", summary="Liveness", response_model=None)
async def live() -> dict:
    return {"live": True}


@router.get("/health/ready", summary="Readiness: warmed up, the queue not full",
            response_model=None)
async def ready(request: Request) -> dict | JSONResponse:
    why = request.app.state.halfstep.not_ready_reason()
    return error(503, f"not ready: {why}") if why else {"ready": True}


@router.post("/repository/index", summary="The served models (model repository extension)",
             response_model=None)
async def repository_index(request: Request) -> list[dict]:
    state: ServerState = request.app.state.halfstep
    return [{"name": name, "version": VERSION,
             "state": "READY" if d.ready else "UNAVAILABLE" if d.warmup else "LOADING"}
            for name, d in state.deployments.items()]


@router.get("/models/{name}", summary="Model metadata",
            response_model=None)
@router.get("/models/{name}/versions/{version}", summary="Model metadata",
            response_model=None, include_in_schema=False)
async def model_metadata(request: Request, name: str,
                         version: str | None = None) -> dict | JSONResponse:
    state: ServerState = request.app.state.halfstep
    missing = unknown_model(state, name, version)
    if missing:
        return missing
    c, h, w = state.deployments[name].bundle.image_shape
    shapes = {"SEED": [-1], "LABEL": [-1], "NOISE": [-1, c, h, w], "IMAGE": [-1, h, w, c],
              "IMAGE_FP32": [-1, c, h, w]}
    return {
        "name": name, "versions": [VERSION], "platform": PLATFORM,
        "inputs": [{"name": k, "datatype": d, "shape": shapes[k]} for k, d in INPUTS.items()],
        "outputs": [{"name": k, "datatype": d, "shape": shapes[k]} for k, d in OUTPUTS.items()],
    }


@router.get("/models/{name}/ready", summary="Model readiness",
            response_model=None)
@router.get("/models/{name}/versions/{version}/ready", summary="Model readiness",
            response_model=None, include_in_schema=False)
async def model_ready(request: Request, name: str,
                      version: str | None = None) -> dict | JSONResponse:
    state: ServerState = request.app.state.halfstep
    missing = unknown_model(state, name, version)
    if missing:
        return missing
    why = state.not_ready_reason(state.deployments[name])  # this model, not the others
    return error(503, f"not ready: {why}") if why else {"name": name, "ready": True}


@router.post("/models/{name}/infer", summary="Inference",
             response_model=None)
@router.post("/models/{name}/versions/{version}/infer", summary="Inference",
             response_model=None, include_in_schema=False)
async def infer(request: Request, name: str, version: str | None = None) -> Response:
    state: ServerState = request.app.state.halfstep
    started = time.perf_counter()
    job, response = None, None
    try:
        response = unknown_model(state, name, version)
        if response is not None:
            return response
        d = state.deployments[name]
        request.state.deployment = d
        check_ready(state, d)
        body = await request.body()
        doc, binary = split_body(body, request.headers.get(HEADER_LENGTH))
        job, wanted = await asyncio.to_thread(parse_infer, doc, binary, d.bundle)
        job = dataclasses.replace(job, bundle=d.name)  # counted under its bundle, refused or not
        job, result = await run_job(request, state, d, job)
        request.state.n, request.state.batch_size = job.n, result.batch_images
        head = {"model_name": name, "model_version": VERSION, "id": str(doc.get("id", "")),
                "parameters": {"model": job.model, "steps": job.steps}}
        if job.requested is not None:
            head["parameters"]["requested_steps"] = job.requested
        content, header_length = await asyncio.to_thread(
            response_body, head, outputs(wanted, result.images))
        if header_length is None:
            response = Response(content, media_type="application/json")
        else:
            response = Response(content, media_type="application/octet-stream",
                                headers={HEADER_LENGTH: str(header_length)})
        response.headers["X-Halfstep-Steps"] = str(job.steps)
        response.headers["X-Halfstep-Bundle"] = d.name
    except REFUSALS as exc:
        response = refusal(request, exc)
    finally:
        record_request(state, job, response.status_code if response else 500, started)
    return response


def parse_infer(doc: dict[str, Any], binary: bytes,
                bundle: Bundle) -> tuple[GenerateJob, list[OutputRequest]]:
    """The job an infer request of `bundle` asks for (steps resolved as /generate resolves
    them, noise drawn from the seeds) and the outputs it wants."""
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidRequest("'parameters' must be an object")
    unknown = set(params) - set(PARAMETERS) - IGNORED_PARAMETERS
    if unknown:
        raise InvalidRequest(f"unknown parameters {sorted(unknown)}; allowed: "
                             f"{', '.join(PARAMETERS)}")
    wanted = requested_outputs(doc, tuple(OUTPUTS), ("IMAGE",))
    arrays = read_inputs(doc, binary, INPUTS)
    if ("SEED" in arrays) == ("NOISE" in arrays):
        raise InvalidRequest("give exactly one of the inputs SEED and NOISE")
    source = arrays.get("SEED", arrays.get("NOISE"))
    n = source.shape[0] if source.ndim else 0
    if not 1 <= n <= MAX_N:
        raise InvalidRequest(f"{n} images asked for; allowed: 1..{MAX_N}")
    noise = _noise(arrays, n, bundle.image_shape)
    labels = _labels(arrays.get("LABEL"), n, bundle.num_labels)
    checked = _check_parameters(params)
    # the step rule of /generate, applied by its own code (the one image it draws is unused)
    job = prepare({**checked, "n": 1, "seed": 0}, bundle)
    return dataclasses.replace(job, n=n, noise=noise, labels=labels, label=None,
                               seed=int(arrays["SEED"][0]) if "SEED" in arrays else 0,
                               fmt="oip"), wanted


def _check_parameters(params: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    model = params.get("model", "student")
    if model not in ("student", "teacher"):
        raise InvalidRequest(f"parameter model={model!r}; allowed: student, teacher")
    out["model"] = model
    for key, top in (("steps", MAX_BUDGET), ("deadline_ms", MAX_DEADLINE_MS)):
        value = params.get(key)
        if value is None:
            continue
        if type(value) is not int or not 1 <= value <= top:
            raise InvalidRequest(f"parameter {key}={value!r}; allowed: an integer 1..{top}")
        out[key] = value
    return out


def _noise(arrays: dict[str, np.ndarray], n: int, shape: tuple[int, ...]) -> torch.Tensor:
    if "SEED" in arrays:
        seeds = arrays["SEED"]
        if seeds.shape != (n,):
            raise InvalidRequest(f"input SEED: shape {list(seeds.shape)}, expected [n]")
        if (seeds < 0).any() or (seeds > MAX_SEED).any():
            raise InvalidRequest(f"input SEED: every seed must be in 0..{MAX_SEED}")
        return noise_for_seeds([int(s) for s in seeds], shape)
    noise = arrays["NOISE"]
    if noise.shape != (n, *shape):
        raise InvalidRequest(f"input NOISE: shape {list(noise.shape)}, expected "
                             f"[n, {', '.join(map(str, shape))}]")
    if not np.isfinite(noise).all():
        raise InvalidRequest("input NOISE: every value must be finite")
    return torch.from_numpy(noise.astype(np.float32, copy=True))


def _labels(label: np.ndarray | None, n: int, k: int) -> torch.Tensor:
    if label is None:
        return torch.full((n,), k, dtype=torch.int64)
    if label.shape != (n,):
        raise InvalidRequest(f"input LABEL: shape {list(label.shape)}, expected [{n}]")
    if ((label < -1) | (label >= k)).any():
        raise InvalidRequest(f"input LABEL: allowed: 0..{k - 1}, or -1 (unconditional)"
                             if k else "input LABEL: this bundle is unconditional: only -1")
    return torch.from_numpy(np.where(label < 0, k, label).astype(np.int64))


def outputs(wanted: list[OutputRequest], images: torch.Tensor
            ) -> list[tuple[OutputRequest, str, np.ndarray]]:
    """The asked-for outputs of `images` ([n, C, H, W] in [-1, 1])."""
    made = {"IMAGE": lambda: to_uint8(images),
            "IMAGE_FP32": lambda: images.detach().float().cpu().clamp(-1, 1).numpy()}
    return [(w, OUTPUTS[w.name], made[w.name]()) for w in wanted]
