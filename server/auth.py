"""Bearer-token check as pure ASGI middleware: a protected request without the right token is
answered 401 before any of its body is read or parsed (so a stranger learns nothing about the
parameters a bundle allows).

Protected when HALFSTEP_API_KEY is set: /generate, /v1/*, /v2/* (but the Open Inference
Protocol's /v2/health/live and /v2/health/ready), /admin/*, and /metrics with auth_metrics.
Open: the playground, /docs, /redoc, /openapi.json, /healthz, /readyz and, by default, /metrics.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import Unauthorized, reject

if TYPE_CHECKING:
    from .settings import Settings

PROTECTED_PREFIXES = ("/v1", "/v2", "/admin")
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})


def auth_metrics_enabled(settings: Settings) -> bool:
    """Whether /metrics needs the bearer token (HALFSTEP_AUTH_METRICS / --auth-metrics)."""
    return settings.auth_metrics


def is_protected(path: str, auth_metrics: bool = False) -> bool:
    """Whether a request for `path` needs the bearer token (once a key is set)."""
    if path in OPEN_PATHS:
        return False
    if path == "/generate" or path.startswith("/generate/"):
        return True
    if auth_metrics and (path == "/metrics" or path.startswith("/metrics/")):
        return True
    return any(path == p or path.startswith(p + "/") for p in PROTECTED_PREFIXES)


def bearer_token(scope: Scope) -> str | None:
    """The token of the first Authorization header if its scheme is Bearer (any case), read
    as Starlette's HTTPBearer reads it (latin-1 header, split at the first space)."""
    for name, value in scope.get("headers") or []:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token if scheme.lower() == "bearer" and token else None
    return None


def token_ok(token: str | None, key: str) -> bool:
    """Constant-time comparison of the presented token with the key."""
    return token is not None and hmac.compare_digest(token.encode(), key.encode())


class BearerAuth:
    """401 + `WWW-Authenticate: Bearer` for a protected path without the right token."""

    def __init__(self, app: ASGIApp, api_key: str | None, auth_metrics: bool = False) -> None:
        self.app, self.api_key, self.auth_metrics = app, api_key, auth_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (scope["type"] != "http" or not self.api_key
                or not is_protected(scope["path"], self.auth_metrics)
                or token_ok(bearer_token(scope), self.api_key)):
            return await self.app(scope, receive, send)
        response = reject(Request(scope), Unauthorized())
        await response(scope, receive, send)
