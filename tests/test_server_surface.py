"""The HTTP surface without a running batcher (ASGI transport): authentication before parsing,
the body limit for chunked bodies, seed bounds, request ids, the catch-all 500 and the
OpenAPI error declarations."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from halfstep.server.access_log import (
    RequestIdFilter,
    server_timing,
    valid_request_id,
    with_request_id,
)
from halfstep.server.app import create_app
from halfstep.server.auth import is_protected
from halfstep.server.request import MAX_SEED
from halfstep.server.settings import Settings, parse_bool

from .test_server_support import InstrumentedEngine, call, make_app

AUTH = {"Authorization": "Bearer s3cret"}


@pytest.fixture(scope="module")
def open_app(tiny_bundle_dir):
    return make_app(tiny_bundle_dir)[0]


# 1. authentication before parsing

def test_unauthenticated_malformed_body_gets_401_not_the_allowed_values(guarded_app):
    r = call(guarded_app, "POST", "/generate", content=b'{"stepz": "x"',
             headers={"content-type": "application/json"})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert "allowed" not in r.json() and "Bearer" in r.json()["error"]


def test_the_body_is_not_read_before_the_token_is_checked(guarded_app):
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read before authentication")

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/generate", "raw_path": b"/generate",
             "query_string": b"", "headers": [(b"content-type", b"application/json")],
             "http_version": "1.1", "scheme": "http", "server": ("test", 80),
             "client": ("127.0.0.1", 1), "root_path": ""}
    asyncio.run(guarded_app(scope, receive, send))
    assert sent[0]["status"] == 401


@pytest.mark.parametrize("path", ["/generate", "/v1/models", "/v1/other", "/v2/models/x/infer",
                                  "/v2", "/admin/drain", "/admin"])
def test_protected_prefixes_answer_401(guarded_app, path):
    r = call(guarded_app, "POST" if path == "/generate" else "GET", path)
    assert r.status_code == 401 and r.json()["error"]


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/docs", "/redoc",
                                  "/openapi.json", "/", "/v2/health/live", "/v2/health/ready"])
def test_open_paths_do_not_ask_for_the_token(guarded_app, path):
    assert call(guarded_app, "GET", path).status_code != 401


def env_app(bundle_dir, **env: str):
    """An app whose settings come from HALFSTEP_* variables (plus the key and the bundle)."""
    from halfstep.distill.bundle import Bundle

    environ = {"HALFSTEP_API_KEY": "s3cret", "HALFSTEP_BUNDLE": str(bundle_dir),
               "HALFSTEP_BACKEND": "torch", **env}
    return create_app(Settings.from_env(environ),
                      engine=InstrumentedEngine(Bundle(bundle_dir)))


def test_metrics_can_be_protected_from_the_environment(tiny_bundle_dir):
    app = env_app(tiny_bundle_dir, HALFSTEP_AUTH_METRICS="true")
    assert call(app, "GET", "/metrics").status_code == 401
    assert call(app, "GET", "/metrics", AUTH).status_code == 200
    assert call(app, "GET", "/healthz").status_code == 200
    for off in ("false", "0", "OFF", "no"):
        assert Settings.from_env({"HALFSTEP_AUTH_METRICS": off}).auth_metrics is False
    assert call(env_app(tiny_bundle_dir, HALFSTEP_AUTH_METRICS="false"),
                "GET", "/metrics").status_code == 200
    with pytest.raises(ValueError, match="HALFSTEP_AUTH_METRICS='maybe' is not a boolean"):
        Settings.from_env({"HALFSTEP_AUTH_METRICS": "maybe"})


def test_middleware_and_route_dependency_agree_on_the_token(guarded_app):
    for headers, status in [({"Authorization": "bearer s3cret"}, 200), (AUTH, 200),
                            ({"Authorization": "Bearer  s3cret"}, 401),
                            ({"Authorization": "Bearer"}, 401),
                            ({"Authorization": "Bearer s3cre"}, 401)]:
        assert call(guarded_app, "GET", "/v1/models", headers).status_code == status, headers


def test_auth_helpers():
    assert is_protected("/generate") and is_protected("/v2/repository/index")
    assert not is_protected("/v2/health/live") and not is_protected("/v10")
    assert not is_protected("/metrics") and is_protected("/metrics", auth_metrics=True)
    assert parse_bool("ON") and parse_bool(" yes ") and not parse_bool("0")
    assert not parse_bool("false")
    with pytest.raises(ValueError, match="not a boolean: use true/false, 1/0, yes/no or on/off"):
        parse_bool("maybe")


# 3. chunked bodies over the limit

def test_an_oversized_chunked_body_gets_413(open_app):
    async def chunks():
        for _ in range(40):
            yield b" " * 1024

    r = call(open_app, "POST", "/generate", content=chunks(),
             headers={"content-type": "application/json"})
    assert r.status_code == 413 and "bytes" in r.json()["error"]


def test_a_small_chunked_body_still_reaches_the_route(open_app):
    async def chunks():
        yield b'{"ste'
        yield b'pz": 4}'

    r = call(open_app, "POST", "/generate", content=chunks(),
             headers={"content-type": "application/json"})
    assert r.status_code == 422 and "stepz" in r.json()["error"]


# 4. seeds that survive JavaScript numbers

def test_seeds_above_2_53_are_refused_with_the_range(open_app):
    assert MAX_SEED == 2**53 - 1
    r = call(open_app, "POST", "/generate", params={"seed": 2**53})
    assert r.status_code == 422
    assert r.json()["allowed"]["seed"] == "0..9007199254740991"


# 6. request ids, access log, OpenAPI

@pytest.mark.parametrize("sent, kept", [("abc-123", True), ("a b:c/d", True),
                                        ("x" * 128, True), ("x" * 129, False), ("", False)])
def test_request_id_is_kept_when_valid_else_replaced(open_app, sent, kept):
    r = call(open_app, "GET", "/healthz", {"X-Request-ID": sent})
    got = r.headers["x-request-id"]
    assert (got == sent) is kept and valid_request_id(got)


def test_request_id_is_made_and_echoed_on_every_response(open_app):
    for method, path in [("GET", "/healthz"), ("GET", "/nope"), ("POST", "/generate?n=0")]:
        r = call(open_app, method, path)
        assert len(r.headers["x-request-id"]) == 32, path
    assert not valid_request_id("caf\u00e9") and not valid_request_id("a\tb")


def test_access_log_line_is_json_with_the_request(open_app, caplog):
    with caplog.at_level(logging.INFO, logger="halfstep.access"):
        call(open_app, "POST", "/generate", {"X-Request-ID": "rid-7"}, params={"n": 0})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "halfstep.access"]
    assert len(lines) == 1
    line = lines[0]
    assert {k: line[k] for k in ("request_id", "method", "path", "status")} == {
        "request_id": "rid-7", "method": "POST", "path": "/generate", "status": 422}
    assert line["duration_ms"] >= 0


def test_an_unexpected_exception_is_a_bare_500_logged_with_the_request_id(tiny_bundle_dir,
                                                                          caplog):
    app = make_app(tiny_bundle_dir)[0]

    @app.get("/boom")
    async def boom():
        raise RuntimeError("CUDA out of memory at /opt/secret/engine.plan")

    caplog.handler.addFilter(RequestIdFilter())
    with caplog.at_level(logging.INFO):
        r = call(app, "GET", "/boom", {"X-Request-ID": "rid-500"})
    assert r.status_code == 500
    assert r.json() == {"error": "internal error (request id rid-500)"}
    assert r.headers["x-request-id"] == "rid-500"
    logged = [rec for rec in caplog.records if "unhandled" in rec.getMessage()]
    assert logged and logged[0].request_id == "rid-500"
    assert "/opt/secret/engine.plan" in caplog.text


def test_openapi_declares_the_error_body_and_refusals_of_generate(open_app):
    schema = call(open_app, "GET", "/openapi.json").json()
    body = schema["components"]["schemas"]["ErrorBody"]
    assert body["required"] == ["error"] and "allowed" in body["properties"]
    responses = schema["paths"]["/generate"]["post"]["responses"]
    for status in ("401", "413", "422", "503", "504"):
        ref = responses[status]["content"]["application/json"]["schema"]["$ref"]
        assert ref == "#/components/schemas/ErrorBody", status
    assert "Retry-After" in responses["503"]["headers"]
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/generate"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/v1/models"]["get"]["security"] == [{"HTTPBearer": []}]
    infer = schema["paths"]["/v2/models/{name}/infer"]["post"]
    assert infer["security"] == [{"HTTPBearer": []}]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    assert "security" not in schema["paths"]["/v2/health/live"]["get"]


def test_logging_helpers():
    assert server_timing("queue;dur=1.5, run;dur=2, encode;dur=x, bare") == {
        "queue": 1.5, "run": 2.0}
    config = {"formatters": {"default": {"fmt": "%(levelprefix)s %(message)s"}},
              "handlers": {"default": {"formatter": "default"}}}
    out = with_request_id(config)
    assert out["formatters"]["default"]["fmt"] == "%(levelprefix)s [%(request_id)s] %(message)s"
    assert out["handlers"]["default"]["filters"] == ["request_id"]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    assert RequestIdFilter().filter(record) and record.request_id == "-"
