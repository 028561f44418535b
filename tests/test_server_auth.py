"""Optional bearer token: /generate, /v1/*, /v2/* and /admin/* need it when HALFSTEP_API_KEY
is set (checked by middleware before the body is read: tests/test_server_surface.py)."""

from __future__ import annotations

import pytest

from halfstep.server.settings import Settings

from .test_server_support import call, make_app


@pytest.mark.parametrize("path, method", [("/generate", "POST"), ("/v1/models", "GET")])
@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"},
                                     {"Authorization": "Basic czNjcmV0"}])
def test_protected_routes_answer_401_without_the_token(guarded_app, path, method, headers):
    r = call(guarded_app, method, path, headers, params={"steps": 1})
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == "Bearer"
    assert "Bearer" in r.json()["error"]


def test_the_right_token_opens_models(guarded_app):
    r = call(guarded_app, "GET", "/v1/models", {"Authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.json()["student_steps"] == [1, 2, 4, 8]


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/"])
def test_health_metrics_and_page_stay_open(guarded_app, path):
    assert call(guarded_app, "GET", path).status_code == 200


def test_key_comes_from_the_environment_only(tiny_bundle_dir):
    settings = Settings.from_env({"HALFSTEP_API_KEY": "k1"}, bundle=str(tiny_bundle_dir))
    assert settings.api_key == "k1"
    assert Settings.from_env({"HALFSTEP_API_KEY": "  "}).api_key is None  # empty = auth off
    app = make_app(tiny_bundle_dir)[0]
    assert call(app, "GET", "/v1/models").status_code == 200  # no key: open
