"""Builds the ASGI app: loads the bundle and engine, then wires the lifespan (batcher and
warm-up), the middleware, the error handlers and the routes together.

Middleware, outermost first: request id, access log and catch-all 500 (`access_log.py`);
bearer token, before any body is read (`auth.py`); body-size limit (`middleware.py`).
"""

from __future__ import annotations

import math
from importlib.resources import files

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from halfstep.distill.bundle import Bundle
from halfstep.engines.base import Engine

from .access_log import RequestContext
from .admin import router as admin_router
from .auth import BearerAuth, auth_metrics_enabled
from .deployments import (  # noqa: F401  (build_engine, served_bundle: re-exported)
    Deployment,
    build_engine,
    open_deployments,
    served_bundle,
)
from .errors import REFUSALS, http_error, invalid_parameters, refused
from .lifespan import lifespan
from .middleware import BodyLimit, infer_body_bytes
from .oip import router as oip_router
from .openapi_errors import declare_errors
from .request import MAX_N
from .routes import generate_router, router
from .settings import Settings
from .state import ServerState


def create_app(settings: Settings | None = None, bundle: Bundle | None = None,
               engine: Engine | None = None, export_cache: bool = False) -> FastAPI:
    """The ASGI app for the settings' bundles (`deployments.open_deployments`). Pass `bundle`
    or a prebuilt (or instrumented) `engine` to serve that one alone; export_cache: see
    `deployments.served_bundle` (`halfstep serve` turns it on)."""
    settings = settings or Settings.from_env()
    if engine is not None or bundle is not None:
        bundle = engine.bundle if engine is not None else bundle
        deployments = [Deployment(bundle.name, str(bundle.root), bundle,
                                  engine or build_engine(settings, bundle))]
    else:
        deployments = open_deployments(settings, export_cache)
    largest = max((d.bundle.image_shape for d in deployments), key=math.prod)

    app = FastAPI(title="halfstep", version="1", lifespan=lifespan, docs_url=None,
                  redoc_url=None,
                  description="Few-step diffusion sampling within a per-request step budget.")
    add_offline_docs(app)
    app.state.halfstep = ServerState(settings, deployments, export_cache)
    # each add_middleware wraps the ones before it: RequestContext ends up outermost
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes,
                       infer_max_bytes=infer_body_bytes(MAX_N, largest))
    app.add_middleware(BearerAuth, api_key=settings.api_key,
                       auth_metrics=auth_metrics_enabled(settings))
    app.add_middleware(RequestContext)
    for refusal in REFUSALS:
        app.add_exception_handler(refusal, refused)
    app.add_exception_handler(RequestValidationError, invalid_parameters)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.include_router(router)
    app.include_router(generate_router(app.state.halfstep))
    app.include_router(oip_router)  # Open Inference Protocol v2 (KServe / Triton clients)
    app.include_router(admin_router)  # POST /admin/reload
    declare_errors(app)
    return app


DOCS_ASSETS = "/docs-assets"
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"


def add_offline_docs(app: FastAPI) -> None:
    """/docs (Swagger UI) and /redoc with their scripts, styles and icon served by this server
    (from the `fastapi-offline` package of the `serve` extra), so they work without internet."""
    assets = files("fastapi_offline") / "static"
    redoc_js: list[bytes] = []  # read on first use

    @app.get(f"{DOCS_ASSETS}/redoc.standalone.js", include_in_schema=False)
    async def redoc_script() -> Response:
        """ReDoc's script with its one hard-wired image from the internet (the sidebar logo)
        replaced by an empty inline one: the page then loads nothing from elsewhere."""
        if not redoc_js:
            text = (assets / "redoc.standalone.js").read_bytes()
            redoc_js.append(text.replace(REDOC_LOGO, EMPTY_SVG))
        return Response(redoc_js[0], media_type="text/javascript")

    # after the route above, so that it, not the mount, answers for the patched script
    app.mount(DOCS_ASSETS, StaticFiles(directory=str(assets)), name="docs-assets")
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
