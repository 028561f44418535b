"""Per-request context, as the outermost pure ASGI middleware: the request id, one JSON access
log line per request, and a bare 500 for anything unhandled.

* `X-Request-ID`: a client's value is kept when it is 1..128 printable ASCII characters,
  otherwise (or when absent) a new one is made; it is echoed on every response and is
  `request_id_var` while the request is handled, which `RequestIdFilter` puts on log records.
* Access log: logger `halfstep.access`, one line per request, a JSON object with request_id,
  method, path, status, duration_ms and, when the response says them, model, steps, lane,
  queue_ms, run_ms and encode_ms (from the X-Halfstep-* and Server-Timing headers) and n and
  batch_size (from `request.state`).
* An unexpected exception is logged with its traceback and answered 500
  `{"error": "internal error (request id ...)"}`: its text never reaches the client.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextvars import ContextVar

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .lanes import lane_label

MAX_REQUEST_ID = 128
STATE_FIELDS = ("n", "batch_size")  # read from request.state when a route set them

request_id_var: ContextVar[str | None] = ContextVar("halfstep_request_id", default=None)
access_log = logging.getLogger("halfstep.access")
log = logging.getLogger("halfstep.server")


def current_request_id() -> str:
    """The id of the request being handled here, or "-" outside one."""
    return request_id_var.get() or "-"


def internal_error_message() -> str:
    """The whole 500 body text: the request id, for finding the logged cause."""
    return f"internal error (request id {current_request_id()})"


def valid_request_id(value: str | None) -> bool:
    return (value is not None and 0 < len(value) <= MAX_REQUEST_ID
            and all(" " <= c <= "~" for c in value))


def request_id_from(scope: Scope) -> str:
    """The client's X-Request-ID if valid, else a new random one."""
    for name, value in scope.get("headers") or []:
        if name.lower() == b"x-request-id":
            text = value.decode("latin-1")
            return text if valid_request_id(text) else uuid.uuid4().hex
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Sets `record.request_id` (the current request's id, or "-"): for `%(request_id)s`."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id()
        return True


def with_request_id(config: dict, handler: str = "default",
                    formatter: str = "default") -> dict:
    """A logging dictConfig with RequestIdFilter on `handler` and the id in `formatter`."""
    config.setdefault("filters", {})["request_id"] = {"()": RequestIdFilter}
    config["handlers"][handler].setdefault("filters", []).append("request_id")
    fmt = config["formatters"][formatter]
    fmt["fmt"] = fmt.get("fmt", "%(message)s").replace(
        "%(message)s", "[%(request_id)s] %(message)s")
    return config


def server_timing(value: str) -> dict[str, float]:
    """`queue;dur=1.5, run;dur=2` -> {"queue": 1.5, "run": 2.0} (malformed parts skipped)."""
    out: dict[str, float] = {}
    for part in value.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        for p in params:
            if p.startswith("dur="):
                try:
                    out[name] = float(p[4:])
                except ValueError:
                    pass
    return out


def access_record(scope: Scope, request_id: str, status: int, duration_s: float,
                  headers: dict[str, str]) -> dict:
    """The access log fields for one finished request."""
    record: dict = {"request_id": request_id, "method": scope.get("method"),
                    "path": scope.get("path"), "status": status,
                    "duration_ms": round(duration_s * 1e3, 3)}
    model, steps = headers.get("x-halfstep-model"), headers.get("x-halfstep-steps")
    if headers.get("x-halfstep-bundle"):
        record["bundle"] = headers["x-halfstep-bundle"]
    if model:
        record["model"] = model
    if steps and steps.isdigit():
        record["steps"] = int(steps)
        if model:
            record["lane"] = lane_label(model, int(steps))
    timing = server_timing(headers.get("server-timing", ""))
    for name in ("queue", "run", "encode"):
        if name in timing:
            record[f"{name}_ms"] = timing[name]
    state = scope.get("state") or {}
    record.update({k: state[k] for k in STATE_FIELDS if state.get(k) is not None})
    return record


class RequestContext:
    """Request id, access log line and the catch-all 500 (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = request_id_from(scope)
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        scope.setdefault("state", {})["arrived"] = started  # request.state.arrived (deadlines)
        status, headers = 500, {}

        async def send_with_id(message: Message) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status = message["status"]
                raw = [(k, v) for k, v in message.get("headers", [])
                       if k.lower() != b"x-request-id"]
                raw.append((b"x-request-id", request_id.encode("latin-1")))
                message = {**message, "headers": raw}
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if headers:  # the response had begun: nothing sane can be sent any more
                raise
            await JSONResponse({"error": internal_error_message()}, 500)(
                scope, receive, send_with_id)
        finally:
            access_log.info(json.dumps(access_record(
                scope, request_id, status, time.perf_counter() - started, headers)))
            request_id_var.reset(token)
