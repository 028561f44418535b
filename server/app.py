"""Builds the ASGI app: loads the bundle and engine, then wires the lifespan (batcher and
warm-up), the body-size limit, the error handlers and the routes together."""

from __future__ import annotations

from importlib.resources import files

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
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

    app = FastAPI(title="halfstep", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Few-step diffusion sampling within a per-request step budget.")
    add_offline_docs(app)
    app.state.halfstep = ServerState(settings, bundle, engine)
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    for refusal in REFUSALS:
        app.add_exception_handler(refusal, refused)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(router)
    app.include_router(generate_router(bundle.num_labels))
    return app


DOCS_ASSETS = "/docs-assets"


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts, styles and icon served by this server
    (from the `fastapi-offline` package of the `serve` extra), so they work without internet."""
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(files("fastapi_offline") / "static")),
              name="docs-assets")
    title, icon = f"{app.title} - API", f"{DOCS_ASSETS}/favicon.png"

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url, title=title, swagger_favicon_url=icon,
            swagger_js_url=f"{DOCS_ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{DOCS_ASSETS}/swagger-ui.css",
            swagger_ui_parameters={"validatorUrl": None})  # no spec validator badge online

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url=app.openapi_url, title=title, redoc_favicon_url=icon,
                              redoc_js_url=f"{DOCS_ASSETS}/redoc.standalone.js",
                              with_google_fonts=False)
