"""The HTTP routes: playground, health, readiness, metrics, model info and /generate.

Handlers read what they serve from `request.app.state.halfstep` (a ServerState). A /generate
request's path: its parameters are validated -> `prepare` resolves the step budget and draws
the noise -> the batcher queues it with a deadline and runs it in a batch -> `encode_response`
writes PNG or JSON. A refusal on the way is answered and counted by `errors.reject`.
"""

# No `from __future__ import annotations`: FastAPI reads the /generate signature, whose
# parameter models are made per bundle inside generate_router.

import asyncio
import dataclasses
import threading
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel

from .admission import check_ready, check_request, teacher_limit
from .batcher import Draining, Overloaded, Result
from .codec import backend_for, encode_response
from .deployments import Deployment
from .errors import REFUSALS, ClientGone, reject
from .lanes import lane_label
from .request import GenerateJob, merge, prepare, request_models, steps_doc
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
  `Server-Timing` (queue, run, encode, and predicted vs. actual queue + run, in ms).
* `bundle`: which served bundle (default: the first; `/v1/models` lists them); the response
  header `X-Halfstep-Bundle` names the one that ran.
* `deadline_ms` with model=student: the largest student within the step budget whose
  predicted completion (work scheduled ahead + its own batch) meets the deadline runs.
* Limits: model=teacher may be turned off, and its steps capped (422 saying the limit); a
  request whose predicted engine time is over the server's per-request bound gets 422 saying
  what to lower. With `exact=true`, deadline_ms never picks a smaller student.
* Errors: 4xx with `{"error": ..., "allowed": ...}`; 503 + Retry-After while warming up or
  draining, when the queue is full, the queued work is over the server's bound, or the
  deadline cannot be met; 504 when the request was not done by its deadline (queued: it never
  ran; a long teacher run stops at its next chunk of steps); 500 if its batch failed.
"""

router = APIRouter()


@router.get("/", include_in_schema=False)
async def playground() -> FileResponse:
    return FileResponse(STATIC / "index.html", media_type="text/html")


@router.get("/healthz", summary="Liveness: the process answers and its engine is healthy",
            response_model=None)
async def healthz(request: Request) -> dict | JSONResponse:
    why = request.app.state.halfstep.unhealthy_reason()
    if why:
        return JSONResponse({"status": "unhealthy", "reason": why}, 503)
    return {"status": "alive"}


@router.get("/readyz", summary="Readiness: warmed up, engine healthy, not draining",
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


@router.get("/v1/models", summary="What this server serves", response_model=None)
async def models(request: Request) -> dict:
    return request.app.state.halfstep.models_info()


def generate_router(state: ServerState) -> APIRouter:
    """POST /generate, its parameters bounded for the served bundles and its `steps` saying
    this server's teacher limit (of the default bundle)."""
    doc = steps_doc(teacher_limit(state), state.settings.teacher == "off")
    names = list(state.deployments)
    most_labels = max(d.bundle.num_labels for d in state.deployments.values())
    query_model, body_model = request_models(most_labels, doc, names)
    generate_routes = APIRouter()

    @generate_routes.post(
        "/generate", summary="Generate images within a step budget", description=GENERATE_DOC,
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
        params = merge(query, body)
        d = state.deployment(params.get("bundle"))
        request.state.deployment = d  # a 422 lists what this bundle allows
        check_ready(state, d)
        # drawing n noise tensors and encoding PNGs are CPU work: off the event loop
        job = dataclasses.replace(await asyncio.to_thread(prepare, params, d.bundle),
                                  bundle=d.name)  # counted under its bundle, refused or not
        job, result = await run_job(request, state, d, job)
        request.state.n, request.state.batch_size = job.n, result.batch_images
        response = await encode_off_loop(encode_response(
            job, result.images, backend=backend_for(d.engine, job.model),
            queue_s=result.queue_s, run_s=result.run_s, started=started))
        timing = (f"predicted;dur={result.predicted_s * 1e3:.2f}, "
                  f"actual;dur={(result.queue_s + result.run_s) * 1e3:.2f}")
        earlier = response.headers.get("Server-Timing")
        response.headers["Server-Timing"] = f"{earlier}, {timing}" if earlier else timing
        response.headers["X-Halfstep-Bundle"] = d.name
        # from its arrival at the outermost middleware: what deadline_ms is measured against
        total = time.perf_counter() - (getattr(request.state, "arrived", None) or started)
        state.observe_overhead(total - result.queue_s - result.run_s)
        if job.deadline_ms is not None:  # calibrates the next deadline predictions
            state.batcher.observe_deadline_job(total, result.predicted_s + state.overhead_s)
    except REFUSALS as exc:
        response = reject(request, exc)
    finally:
        record_request(state, job, response.status_code if response else 500, started)
    return response


async def run_job(request: Request, state: ServerState, d: Deployment,
                  job: GenerateJob) -> tuple[GenerateJob, Result]:
    """The part of a request's path shared by /generate and the inference protocol: check
    the job against this server's limits, let deadline_ms pick the student, queue it in its
    bundle's lane (on the engine it was checked against, even if a reload swaps the bundle
    meanwhile) and wait for its images. Returns the job as it ran (steps, bundle)."""
    if state.batcher is None:
        raise Draining("the server is not serving yet")
    job = dataclasses.replace(job, bundle=d.name)
    check_request(state, job, d)  # teacher off or over its limit, cost over max_request_s
    deadline_s = engine_share(state, _deadline_s(job))
    if deadline_s is not None and job.model == "student":
        job = dataclasses.replace(job, steps=choose_student(state, d, job, deadline_s))
    return job, await submit_watching(request, state, job, deadline_s, d.engine)


def engine_share(state: ServerState, deadline_s: float | None) -> float | None:
    """The part of a request's deadline its engine work must fit in: the deadline divided by
    the predictions' recent error (`Estimates.deadline_slack`), less this server's own
    measured per-request time (parsing, noise, encoding)."""
    if deadline_s is None:
        return None
    return max(deadline_s / state.batcher.deadline_slack() - state.overhead_s, 1e-3)


def _deadline_s(job: GenerateJob) -> float | None:
    deadline_ms = getattr(job, "deadline_ms", None)
    return None if deadline_ms is None else deadline_ms / 1000


def choose_student(state: ServerState, d: Deployment, job: GenerateJob,
                   deadline_s: float) -> int:
    """The largest student of bundle d within the job's step ceiling predicted to finish by
    deadline_s (the engine's share of the job's deadline_ms; with exact=true, only the job's
    own student); Overloaded (503 + Retry-After) when not even the fewest-step student is."""
    batcher = state.batcher
    students = sorted((s for s in d.bundle.student_steps if s <= job.steps), reverse=True)
    if job.exact:
        students = [job.steps]
    predicted = 0.0
    for steps in students:
        predicted = batcher.predict_s((d.name, "student", steps), job.n, deadline_s)
        if predicted <= deadline_s:
            return steps
    asked = getattr(job, "deadline_ms", None) or round(deadline_s * 1e3)
    raise Overloaded(f"no student meets deadline_ms={asked}: the fastest is predicted at "
                     f"{predicted * 1e3:.1f} ms (engine share of the deadline "
                     f"{deadline_s * 1e3:.1f} ms)", predicted - deadline_s)


class _EncodeLoop:
    """One daemon thread with its own event loop, where responses are encoded: the server's
    loop only waits on the result (encode_response is a coroutine, so it needs a loop)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.lock = threading.Lock()

    def get(self) -> asyncio.AbstractEventLoop:
        with self.lock:
            if self.loop is None:
                self.loop = asyncio.new_event_loop()
                threading.Thread(target=self.loop.run_forever, name="halfstep-encode",
                                 daemon=True).start()
            return self.loop


_ENCODER = _EncodeLoop()


async def encode_off_loop(coro):
    """Await coroutine `coro` run on the encoding thread's loop, not this one."""
    return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, _ENCODER.get()))


def record_request(state: ServerState, job: GenerateJob | None, status: int,
                   started: float) -> None:
    """Count a finished /generate request, its duration (once it had a job) and its images.
    The steps label is the lane (student steps, or "teacher"): never a raw client value."""
    state.metrics.requests.labels(str(status)).inc()
    if job is not None:
        bundle = job.bundle or state.default
        state.metrics.request_duration.labels(
            bundle, job.model, lane_label(job.model, job.steps), str(status)
        ).observe(time.perf_counter() - started)
        if status == 200:
            state.metrics.images.labels(bundle, job.model).inc(job.n)


async def submit_watching(request: Request, state: ServerState, job: GenerateJob,
                          deadline_s: float | None = None, engine=None) -> Result:
    """Queue the job in its bundle's lane; if the client disconnects first, cancel it so it
    never runs."""
    submit = asyncio.ensure_future(state.batcher.submit(
        (job.bundle or state.default, job.model, job.steps), job.noise, job.labels,
        state.settings.timeout_s, deadline_s=deadline_s,
        max_backlog_s=float(getattr(state.settings, "max_backlog_s", 0.0) or 0.0),
        engine=engine))
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
