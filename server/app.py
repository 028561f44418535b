"""The HTTP service: routes, validation and encoding around the batcher (docs/SERVING.md).

A request's path: `generate` validates -> `Batcher.submit` queues it with a deadline -> the
batch loop runs the engine in its own thread -> split -> PNG/JSON encode here.
"""

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Literal

from fastapi import Body, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .batcher import Batcher, BatchFailed, DeadlineExceeded, Draining, QueueFull
from .codec import (
    GENERATE_DOC,
    MAX_BUDGET,
    MAX_N,
    MAX_SEED,
    STEPS_DOC,
    InvalidRequest,
    encode_response,
    merge,
    params_model,
    prepare,
)
from .metrics import Metrics
from .settings import Settings, batch_buckets

log = logging.getLogger("halfstep.server")
STATIC = Path(__file__).parent / "static"


class ApiError(Exception):
    """An error answered as `{"error": message, ...extra}` with an HTTP status."""

    def __init__(self, status: int, message: str, reason: str | None = None,
                 headers: dict[str, str] | None = None, **extra) -> None:
        super().__init__(message)
        self.status, self.message, self.reason = status, message, reason
        self.headers, self.extra = headers or {}, extra

    def response(self) -> JSONResponse:
        return JSONResponse({"error": self.message, **self.extra}, self.status, self.headers)


class ServerState:
    """Everything one app instance serves; stored on `app.state.halfstep`."""

    def __init__(self, settings: Settings, bundle: Bundle, engine: Engine) -> None:
        self.settings, self.bundle, self.engine = settings, bundle, engine
        self.metrics = Metrics()
        self.max_batch = min(settings.max_batch, engine.max_batch or settings.max_batch)
        self.batcher: Batcher | None = None
        self.ready = False
        self.warmup: dict | str | None = None  # info dict when done, error text when it failed

    def models_info(self) -> dict:
        b = self.bundle
        return {
            "name": b.name, "image_shape": list(b.image_shape), "num_labels": b.num_labels,
            "student_steps": b.student_steps, "teacher_default_steps": b.teacher_default_steps,
            "teacher_max_steps": b.teacher_max_steps, "backend": self.engine.name,
            "batch_buckets": self.engine.used_buckets() if self.engine.buckets else [],
            "max_batch": self.max_batch, "max_n": MAX_N,
        }


def build_engine(settings: Settings, bundle: Bundle) -> Engine:
    from halfstep.engines.factory import make_engine

    return make_engine(bundle, settings.backend, buckets=batch_buckets(settings.max_batch))


def load_bundle(settings: Settings) -> Bundle:
    from .embedded import default_bundle_path

    return Bundle(settings.bundle if settings.bundle else default_bundle_path())


def create_app(settings: Settings | None = None, bundle: Bundle | None = None,
               engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Pass `engine` to serve a prebuilt (or instrumented) engine."""
    settings = settings or Settings.from_env()
    if engine is not None:
        bundle = engine.bundle
    bundle = bundle or load_bundle(settings)
    engine = engine or build_engine(settings, bundle)
    state = ServerState(settings, bundle, engine)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.batcher = Batcher(engine, state.max_batch, settings.max_wait_ms / 1000,
                                settings.max_queue, state.metrics, settings.max_wait_fraction)
        state.batcher.start()
        warm = asyncio.create_task(_warm_up(state))  # /healthz answers while this runs
        yield
        warm.cancel()
        state.ready = False
        state.metrics.ready.set(0)
        failed = await state.batcher.close(settings.drain_s)
        if failed:
            log.warning("drain timed out: %d queued requests were failed", failed)

    app = FastAPI(title="halfstep", version="1", lifespan=lifespan,
                  description="Few-step diffusion sampling within a per-request step budget.")
    app.state.halfstep = state
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    bearer = HTTPBearer(auto_error=False, description="set when HALFSTEP_API_KEY is configured")

    def authorize(creds: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        key = settings.api_key
        if key and not (creds and hmac.compare_digest(creds.credentials.encode(), key.encode())):
            state.metrics.rejected.labels("unauthorized").inc()
            raise ApiError(401, "missing or wrong bearer token: send 'Authorization: Bearer "
                           "<HALFSTEP_API_KEY>'", headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
        if request.url.path == "/generate":
            state.metrics.requests.labels("422").inc()
            state.metrics.rejected.labels("invalid").inc()
        return JSONResponse({"error": "; ".join(problems), "allowed": allowed(state)}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return JSONResponse({"error": str(exc.detail)}, exc.status_code, exc.headers)

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", summary="Readiness: warmed up and the queue is not full")
    async def readyz():
        b = state.batcher
        why = ("warming up" if state.warmup is None else f"warm-up failed: {state.warmup}"
               if not state.ready else "draining" if b is None or b.closing
               else "queue full" if b.full else None)
        if why:
            return JSONResponse({"status": "not ready", "reason": why}, 503)
        return {"status": "ready", "queue_depth": b.depth, "warmup": state.warmup}

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    async def metrics():
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    @app.get("/v1/models", summary="What this server serves", dependencies=[Depends(authorize)])
    async def models():
        return state.models_info()

    Body_ = params_model(bundle.num_labels)

    @app.post("/generate", summary="Generate images within a step budget",
              description=GENERATE_DOC, dependencies=[Depends(authorize)],
              responses={200: {"content": {"image/png": {}, "application/json": {}}}})
    async def generate(
        request: Request,
        steps: int | None = Query(None, ge=1, le=MAX_BUDGET, description=STEPS_DOC),
        model: Literal["student", "teacher"] | None = Query(None, description="default student"),
        n: int | None = Query(None, ge=1, le=MAX_N, description="images (default 1)"),
        seed: int | None = Query(None, ge=0, le=MAX_SEED, description="image i uses seed+i"),
        label: int | None = Query(None, ge=0, le=max(bundle.num_labels - 1, 0),
                                  description="class label; absent = unconditional"),
        format: Literal["png", "json"] | None = Query(None, description="default png"),
        body: Body_ | None = Body(None, description="the same fields as the query"),
    ) -> Response:
        started = time.perf_counter()
        query = dict(steps=steps, model=model, n=n, seed=seed, label=label, format=format)
        job, status = None, 500
        try:
            job = prepare(merge(query, body), state.bundle)
            result = await _submit_watching(request, state, job)
            response = await encode_response(job, result, state.engine.name, started)
            status = 200
            return response
        except InvalidRequest as exc:
            status = 422
            state.metrics.rejected.labels("invalid").inc()
            return JSONResponse({"error": str(exc), "allowed": allowed(state)}, 422)
        except ApiError as exc:
            status = exc.status
            if exc.reason:
                state.metrics.rejected.labels(exc.reason).inc()
            return exc.response()
        finally:
            state.metrics.requests.labels(str(status)).inc()
            if job is not None:
                state.metrics.request_duration.labels(job.model, str(job.steps), str(status)) \
                    .observe(time.perf_counter() - started)
                if status == 200:
                    state.metrics.images.labels(job.model).inc(job.n)

    return app


async def _warm_up(state: ServerState) -> None:
    try:
        state.warmup = await state.batcher.call_in_engine_thread(state.engine.warmup)
        state.batcher.seed_run_times(state.engine.warm_run_s)
        state.ready = True
        state.metrics.ready.set(1)
        log.info("warm-up done: %s", state.warmup)
    except Exception as exc:  # readiness reports it; liveness stays up so logs can be read
        state.warmup = f"{type(exc).__name__}: {exc}"
        log.error("warm-up failed: %s", state.warmup)


async def _submit_watching(request: Request, state: ServerState, job):
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
    if not submit.done() or submit.cancelled():
        raise ApiError(499, "client closed the connection before its batch ran")
    try:
        return submit.result()
    except QueueFull as exc:
        raise ApiError(503, f"{exc}; retry shortly", headers={"Retry-After": "1"}) from None
    except Draining as exc:
        raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None
    except DeadlineExceeded as exc:
        raise ApiError(504, str(exc)) from None
    except BatchFailed as exc:
        raise ApiError(500, f"the batch holding this request failed: {exc}") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body, if any, was already read)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def allowed(state: ServerState) -> dict:
    b = state.bundle
    k = b.num_labels
    return {
        "model": ["student", "teacher"],
        "steps": f"student: a budget >= {b.student_steps[0] if b.student_steps else '-'} "
                 f"(students: {', '.join(map(str, b.student_steps))}); "
                 f"teacher: exact, 1..{b.teacher_max_steps}",
        "n": f"1..{MAX_N}", "seed": f"0..{MAX_SEED}",
        "label": f"0..{k - 1} or absent (unconditional)" if k else "absent (unconditional model)",
        "format": ["png", "json"],
    }


class BodyLimit:
    """Pure ASGI middleware: 413 for request bodies over max_bytes (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length", b"0")
        try:
            too_big = int(declared) > self.max_bytes
        except ValueError:
            too_big = False
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge
            return message

        try:
            if too_big:
                raise _TooLarge
            await self.app(scope, limited, send)
        except _TooLarge:
            msg = f"request body over {self.max_bytes} bytes; send parameters in the query"
            await JSONResponse({"error": msg}, 413)(scope, receive, send)


class _TooLarge(Exception):
    pass
