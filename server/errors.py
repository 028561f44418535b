"""How refusals are answered and counted: one table from error type to HTTP status, the reason
label of `halfstep_rejected_total` and the `{"error": ...}` body.

`reject` is the one place a refused request is answered and counted; the exception handlers
below and the /generate route both go through it. Every body is JSON with an "error" key;
a 422 also says what each parameter may be ("allowed").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .access_log import current_request_id
from .admission import teacher_limit
from .batcher import BatchFailed, DeadlineExceeded, Draining, Overloaded, QueueFull
from .outcomes import NotReady, Unhealthy
from .request import InvalidRequest, allowed, unknown_field


class Unauthorized(Exception):
    """The bearer token is missing or wrong while HALFSTEP_API_KEY is set."""


class ClientGone(Exception):
    """The client closed the connection before its request was answered."""


RETRY_SOON = {"Retry-After": "1"}
log = logging.getLogger("halfstep.server")


@dataclass(frozen=True)
class Rejection:
    status: int
    reason: str  # label of halfstep_rejected_total (every one is listed in REJECT_REASONS)
    message: str = "{exc}"  # formatted with the exception and the request_id
    headers: dict[str, str] = field(default_factory=dict)
    with_allowed: bool = False  # add what each parameter may be


REJECTIONS: dict[type[Exception], Rejection] = {
    Unauthorized: Rejection(
        401, "unauthorized",
        "missing or wrong bearer token: send 'Authorization: Bearer <HALFSTEP_API_KEY>'",
        {"WWW-Authenticate": "Bearer"}),
    InvalidRequest: Rejection(422, "invalid", with_allowed=True),
    QueueFull: Rejection(503, "queue_full", "{exc}; retry shortly", RETRY_SOON),
    # Retry-After: the computed seconds over the bound (the exception's own headers)
    Overloaded: Rejection(503, "overloaded", "{exc}; retry later or lower n or steps"),
    # NotReady and Unhealthy are kinds of Draining: the most specific type found wins
    NotReady: Rejection(503, "not_ready", headers=RETRY_SOON),
    Unhealthy: Rejection(503, "unhealthy", headers=RETRY_SOON),
    Draining: Rejection(503, "draining", headers=RETRY_SOON),
    DeadlineExceeded: Rejection(504, "deadline"),
    # the engine's text (paths, memory figures) is logged with the request id, never sent
    BatchFailed: Rejection(500, "error", "internal error (request id {request_id})"),
    ClientGone: Rejection(499, "cancelled", "client closed the connection before its batch ran"),
}
REFUSALS = tuple(REJECTIONS)  # for `except REFUSALS`


def reject(request: Request, exc: Exception) -> JSONResponse:
    """Count `exc` under its reason and answer it as REJECTIONS says."""
    rule = next(REJECTIONS[t] for t in type(exc).__mro__ if t in REJECTIONS)
    state = request.app.state.halfstep
    state.metrics.rejected.labels(rule.reason).inc()
    if rule.status == 500:  # a server fault: its cause goes to the log only
        log.error("request failed: %s: %s", type(exc).__name__, exc)
    body = {"error": rule.message.format(exc=exc, request_id=current_request_id())}
    if rule.with_allowed:
        d = getattr(request.state, "deployment", None) or state.deployment(None)
        body["allowed"] = allowed(d.bundle, teacher_limit(state, d),
                                  state.settings.teacher == "off", list(state.deployments))
    headers = {**rule.headers, **getattr(exc, "headers", {})}  # e.g. a computed Retry-After
    return JSONResponse(body, rule.status, headers)


async def invalid_parameters(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Parameters that fail their declared types or bounds: 422, one line per problem."""
    problems = [unknown_field(str(e["loc"][-1])) if e["type"] == "extra_forbidden"
                else f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()]
    if request.url.path == "/generate":  # it never reached its route, which counts the rest
        request.app.state.halfstep.metrics.requests.labels("422").inc()
    return reject(request, InvalidRequest("; ".join(problems)))


async def refused(request: Request, exc: Exception) -> JSONResponse:
    """Handler for the REJECTIONS raised outside a route body (e.g. Unauthorized)."""
    return reject(request, exc)


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404, 405 and the like, in the same `{"error": ...}` shape (not counted as refusals)."""
    return JSONResponse({"error": str(exc.detail)}, exc.status_code, exc.headers)
