"""First-hour contract of /generate: one step rule, exact steps, unknown fields, deadline_ms."""

from __future__ import annotations

import re

import httpx
import pytest

from halfstep.server.request import FIELDS, GenerateJob, prepare
from halfstep.server.settings import Settings

from .test_server_support import make_app, serving


@pytest.fixture(scope="module")
def server(tiny_bundle_dir):
    app, engine = make_app(tiny_bundle_dir)
    with serving(app) as url:
        yield url


def test_settings_max_backlog_s_reads_flag_env_and_default():
    assert Settings().max_backlog_s == 0.0
    assert Settings.from_env({"HALFSTEP_MAX_BACKLOG_S": "2.5"}).max_backlog_s == 2.5
    assert Settings.from_env({"HALFSTEP_MAX_BACKLOG_S": "2.5"}, max_backlog_s=1.0) \
        .max_backlog_s == 1.0
    with pytest.raises(ValueError, match="max_backlog_s"):
        Settings(max_backlog_s=-1)
    from halfstep.cli import build_parser

    args = build_parser().parse_args(["serve", "--max-backlog-s", "2"])
    assert args.max_backlog_s == 2.0


def test_prepare_fills_deadline_ms_and_exact_rule(tiny_bundle):
    job = prepare({"steps": 7, "deadline_ms": 250}, tiny_bundle)
    assert isinstance(job, GenerateJob) and (job.steps, job.deadline_ms) == (4, 250)
    assert prepare({}, tiny_bundle).deadline_ms is None
    assert prepare({}, tiny_bundle).steps == 8  # no steps: the largest student
    assert prepare({"steps": 4, "exact": True}, tiny_bundle).steps == 4


@pytest.mark.parametrize("where", ["params", "json"])
def test_exact_steps_without_a_student_is_422_listing_the_students(server, where):
    with httpx.Client(base_url=server, timeout=60) as h:
        bad = h.post("/generate", **{where: {"steps": 3, "exact": True}})
        ok = h.post("/generate", **{where: {"steps": 2, "exact": True, "seed": 1}})
        budget = h.post("/generate", **{where: {"steps": 3, "seed": 1}})
    assert bad.status_code == 422
    assert "students: 1, 2, 4, 8" in bad.json()["error"]
    assert ok.status_code == budget.status_code == 200
    assert ok.headers["x-halfstep-steps"] == budget.headers["x-halfstep-steps"] == "2"


@pytest.mark.parametrize("where", ["params", "json"])
def test_unknown_fields_are_refused_alike_in_query_and_body(server, where):
    r = httpx.post(f"{server}/generate", **{where: {"stpes": 4}}, timeout=30)
    assert r.status_code == 422
    error = r.json()["error"]
    assert error.startswith(f"unknown field 'stpes'; allowed: {', '.join(FIELDS)}")
    assert "did you mean 'steps'" in error


def test_deadline_ms_is_bounded_and_accepted(server):
    with httpx.Client(base_url=server, timeout=60) as h:
        assert h.post("/generate", params={"deadline_ms": 0}).status_code == 422
        assert h.post("/generate", params={"deadline_ms": 600_001}).status_code == 422
        assert h.post("/generate", json={"steps": 1, "deadline_ms": 5000}).status_code == 200


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_nothing_from_outside(server, page):
    with httpx.Client(base_url=server, timeout=30) as h:
        html = h.get(page)
        assert html.status_code == 200
        assert not re.findall(r"https?://", html.text), "a URL outside this server"
        assets = re.findall(r'(?:src|href)="([^"]+)"', html.text)
        assert any(a.endswith(".js") for a in assets)
        for asset in assets:
            assert asset.startswith("/"), asset
            got = h.get(asset)
            assert got.status_code == 200 and len(got.content) > 1000, asset
        assert h.get("/openapi.json").status_code == 200
