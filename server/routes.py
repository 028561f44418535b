"""The HTTP routes: playground, health, readiness, metrics, model info and /generate.

Handlers read what they serve from `request.app.state.halfstep` (a ServerState). A /generate
request's path: its parameters are validated -> `prepare` resolves the step budget and draws
the noise -> the batcher queues it with a deadline and runs it in a batch -> `encode_response`
writes PNG or JSON. A refusal on the way is answered and counted by `errors.reject`.
"""

# No `from __future__ import annotations`: FastAPI reads the /generate signature, whose
# parameter models are made per bundle inside generate_router.

import asyncio
import hmac
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from .batcher import Result
from .codec import encode_response
from .errors import REFUSALS, ClientGone, Unauthorized, reject
from .request import GenerateJob, merge, prepare, request_models
from .state import ServerState

STATIC = Path(__file__).parent / "static"
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

bearer = HTTPBearer(auto_error=False, description="set when HALFSTEP_API_KEY is configured")


def authorize(request: Request,
              creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
    """Raise Unauthorized unless the bearer token is HALFSTEP_API_KEY (when that is set)."""
    key = request.app.state.halfstep.settings.api_key
    if key and not (creds and hmac.compare_digest(creds.credentials.encode(), key.encode())):
        raise Unauthorized


router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/healthz", summary="Liveness: the process answers", response_model=None)
async def healthz() -> dict:
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: warmed up and the queue is not full",
            response_model=None)
async def readyz(request: Request) -> dict | JSONResponse:
    state: ServerState = request.app.state.halfstep
    why = state.not_ready_reason()
    if why:
        return JSONResponse({"status": "not ready", "reason": why}, 503)
    return {"status": "ready", "queue_depth": state.batcher.depth, "warmup": state.warmup}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.halfstep
    return Response(state.metrics.render(), media_type=state.metrics.content_type)


@router.get("/v1/models", summary="What this server serves", dependencies=[Depends(authorize)],
            response_model=None)
async def models(request: Request) -> dict:
    return request.app.state.halfstep.models_info()


def generate_router(num_labels: int) -> APIRouter:
    """POST /generate, its parameters bounded for a bundle with `num_labels` labels."""
    query_model, body_model = request_models(num_labels)
    generate_routes = APIRouter()

    @generate_routes.post(
        "/generate", summary="Generate images within a step budget", description=GENERATE_DOC,
        dependencies=[Depends(authorize)],
        responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(
        request: Request,
        query: Annotated[query_model, Query()],
        body: Annotated[body_model | None,
                        Body(description="the same fields as the query")] = None,
    ) -> Response:
        return await answer_generate(request, query, body)

    return generate_routes


async def answer_generate(request: Request, query: BaseModel,
                          body: BaseModel | None) -> Response:
    """Run one /generate request end to end and record it in the request metrics."""
    state: ServerState = request.app.state.halfstep
    started = time.perf_counter()
    job, response = None, None
    try:
        job = prepare(merge(query, body), state.bundle)
        result = await _submit_watching(request, state, job)
        response = await encode_response(
            job, result.images, backend=state.engine.name, queue_s=result.queue_s,
            run_s=result.run_s, started=started)
    except REFUSALS as exc:
        response = reject(request, exc)
    finally:
        _record(state, job, response.status_code if response else 500, started)
    return response


def _record(state: ServerState, job: GenerateJob | None, status: int, started: float) -> None:
    """Count a finished /generate request, its duration (once it had a job) and its images."""
    state.metrics.requests.labels(str(status)).inc()
    if job is not None:
        state.metrics.request_duration.labels(job.model, str(job.steps), str(status)) \
            .observe(time.perf_counter() - started)
        if status == 200:
            state.metrics.images.labels(job.model).inc(job.n)


async def _submit_watching(request: Request, state: ServerState, job: GenerateJob) -> Result:
    """Queue the job; if the client disconnects first, cancel it so it never runs."""
    submit = asyncio.ensure_future(state.batcher.submit(
        (job.model, job.steps), job.noise, job.labels, state.settings.timeout_s))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({submit, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not submit.done():
            submit.cancel()
            await asyncio.wait({submit})  # until the batcher has dropped or abandoned it
    if submit.cancelled():
        raise ClientGone
    return submit.result()


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body, if any, was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
