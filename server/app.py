"""Builds the ASGI app: loads the bundle and engine, then wires the lifespan (batcher and
warm-up), the body-size limit, the error handlers and the routes together."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .embedded import load_bundle
from .errors import REFUSALS, http_error, invalid_parameters, refused
from .lifespan import lifespan
from .middleware import BodyLimit
from .routes import generate_router, router
from .settings import Settings, batch_buckets
from .state import ServerState


def build_engine(settings: Settings, bundle: Bundle) -> Engine:
    """The engine for `settings.backend`, with batch buckets 1, 2, 4, ... up to max_batch."""
    from halfstep.engines.factory import make_engine

    return make_engine(bundle, settings.backend, buckets=batch_buckets(settings.max_batch))


def create_app(settings: Settings | None = None, bundle: Bundle | None = None,
               engine: Engine | None = None) -> FastAPI:
    """The ASGI app. Pass `engine` to serve a prebuilt (or instrumented) engine."""
    settings = settings or Settings.from_env()
    if engine is not None:
        bundle = engine.bundle
    bundle = bundle or load_bundle(settings.bundle)
    engine = engine or build_engine(settings, bundle)

    app = FastAPI(title="halfstep", version="1", lifespan=lifespan,
                  description="Few-step diffusion sampling within a per-request step budget.")
    app.state.halfstep = ServerState(settings, bundle, engine)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for refusal in REFUSALS:
        app.add_exception_handler(refusal, refused)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(router)
    app.include_router(generate_router(bundle.num_labels))
    return app
