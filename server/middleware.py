"""Request-body size limit, as pure ASGI middleware (it sees the body before any route does)."""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# the Open Inference Protocol's infer routes, whose NOISE input is n x C x H x W floats
INFER_PATH = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
INFER_HEADROOM = 64 * 1024  # the JSON header, SEED and LABEL beside the binary NOISE


def infer_body_bytes(max_n: int, image_shape: tuple[int, ...]) -> int:
    """Room for an infer request of `max_n` binary FP32 NOISE images of `image_shape`."""
    size = max_n * 4
    for d in image_shape:
        size *= d
    return size + INFER_HEADROOM


class BodyLimit:
    """413 for a request whose body is over its limit (max_bytes; infer_max_bytes for the
    /v2 infer routes): at once when its Content-Length says so; a body without one
    (chunked) is read here first, up to the limit, and then handed on."""

    def __init__(self, app: ASGIApp, max_bytes: int, infer_max_bytes: int | None = None) -> None:
        self.app, self.max_bytes = app, max_bytes
        self.infer_max_bytes = max(max_bytes, infer_max_bytes or 0)

    def limit(self, path: str) -> int:
        """The most body bytes a request for `path` may send."""
        return self.infer_max_bytes if INFER_PATH.match(path) else self.max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = _header(scope, b"content-length")
        if declared is None:
            try:
                body = await _read_capped(receive, limit)
            except _Gone:
                return  # the client left before sending its body: nobody to answer
            if body is None:
                return await _too_large(scope, receive, send, limit)
            receive = _replay(body, receive)
        else:
            try:
                if int(declared) > limit:
                    return await _too_large(scope, receive, send, limit)
            except ValueError:
                pass  # the HTTP server refuses a malformed Content-Length itself
        await self.app(scope, receive, send)


async def _read_capped(receive: Receive, limit: int) -> bytes | None:
    """The whole body, or None once more than `limit` bytes arrived."""
    chunks, seen = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise _Gone
        chunk = message.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _too_large(scope: Scope, receive: Receive, send: Send, limit: int) -> None:
    hint = ("send NOISE as binary tensor data, or SEED instead"
            if INFER_PATH.match(scope["path"]) else "send parameters in the query")
    msg = f"request body over {limit} bytes; {hint}"
    await JSONResponse({"error": msg}, 413)(scope, receive, send)


class _Gone(Exception):
    pass


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers") or []:
        if key.lower() == name:
            return value
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that first gives `body` as one message, then what `receive` gives."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
