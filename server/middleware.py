"""Request-body size limit, as pure ASGI middleware (it sees the body before any route does)."""

from __future__ import annotations

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send


class BodyLimit:
    """413 for a request whose Content-Length is over max_bytes. A body without one is cut
    off once more than max_bytes have arrived (FastAPI then answers 400: body not parsed)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
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
