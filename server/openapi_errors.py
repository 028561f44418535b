"""The error body, the refusals of /generate and the bearer token, in the OpenAPI schema.

FastAPI only knows the 200 and its own 422 shape; the app's openapi() is wrapped so that
/generate declares the real `{"error": ..., "allowed": ...}` body for each refusal, and every
operation that `auth.is_protected` guards declares the bearer scheme (checked by middleware,
which FastAPI does not see).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel, Field

from .auth import is_protected

REF = "#/components/schemas/ErrorBody"
BEARER = {"type": "http", "scheme": "bearer",
          "description": "required when the server has HALFSTEP_API_KEY set"}


class ErrorBody(BaseModel):
    """Every 4xx/5xx answer of this server."""

    error: str = Field(description="what went wrong, and what to do about it")
    allowed: dict[str, Any] | None = Field(
        None, description="with a 422: what each parameter may be for this bundle")


RETRY_AFTER = {"Retry-After": {"description": "seconds to wait before retrying",
                               "schema": {"type": "integer"}}}
GENERATE_ERRORS: dict[str, tuple[str, dict]] = {
    "401": ("missing or wrong bearer token (when HALFSTEP_API_KEY is set)",
            {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}}),
    "413": ("request body over the server's limit", {}),
    "422": ("a parameter is invalid for this bundle; `allowed` says what each may be", {}),
    "500": ("the batch holding this request failed (the cause is in the server's log)", {}),
    "503": ("warming up, unhealthy or draining; queue full, queued work over the bound, or a "
            "deadline no student meets",
            RETRY_AFTER),
    "504": ("the request waited past its deadline and never ran", {}),
}


def declare_errors(app: FastAPI, path: str = "/generate", method: str = "post") -> None:
    """Make app.openapi() add ErrorBody and the refusals of `method path` to the schema."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        schemas["ErrorBody"] = ErrorBody.model_json_schema(
            ref_template="#/components/schemas/{model}")
        operation = schema.get("paths", {}).get(path, {}).get(method)
        if operation is not None:
            responses = operation.setdefault("responses", {})
            for status, (description, headers) in GENERATE_ERRORS.items():
                responses[status] = {
                    "description": description,
                    "content": {"application/json": {"schema": {"$ref": REF}}},
                    **({"headers": headers} if headers else {}),
                }
        guarded = [op for p, ops in schema.get("paths", {}).items() if is_protected(p)
                   for op in ops.values()]
        if guarded:
            schema["components"].setdefault("securitySchemes", {}).setdefault("HTTPBearer", BEARER)
            for op in guarded:
                op.setdefault("security", [{"HTTPBearer": []}])
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
