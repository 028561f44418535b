"""Metric names and units (base units, _total counters), HALFSTEP_* settings and the serve CLI."""

from __future__ import annotations

import pytest

from halfstep.cli import build_parser
from halfstep.server.client import Client
from halfstep.server.metrics import Metrics
from halfstep.server.settings import Settings, batch_buckets

from .test_server_support import make_app, metric_value, serving

NAMES = {
    "halfstep_request_duration_seconds": "histogram",
    "halfstep_queue_wait_seconds": "histogram",
    "halfstep_batch_size": "histogram",
    "halfstep_queue_depth": "gauge",
    "halfstep_requests_total": "counter",
    "halfstep_rejected_total": "counter",
    "halfstep_images_generated_total": "counter",
}


def test_metric_names_types_and_labels(tiny_bundle_dir):
    app, _ = make_app(tiny_bundle_dir)
    with serving(app) as url, Client(url) as c:
        c.generate(steps=3, n=2)
        text = c.metrics()
    types = {line.split()[2]: line.split()[3] for line in text.splitlines()
             if line.startswith("# TYPE halfstep_")}
    for name, kind in NAMES.items():
        assert types.get(name) == kind, name
    bundle = f'bundle="{app.state.halfstep.default}"'
    labels = f'{bundle},model="student",status="200",steps="2"'
    assert metric_value(text, "halfstep_request_duration_seconds_count", labels) == 1
    assert metric_value(text, "halfstep_images_generated_total", f'{bundle},model="student"') == 2
    assert metric_value(text, "halfstep_requests_total", 'status="200"') == 1
    assert metric_value(text, "halfstep_rejected_total", 'reason="queue_full"') == 0
    assert "seed" not in text  # no per-request labels


def test_each_app_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.images.labels("m", "student").inc(3)
    assert metric_value(a.render().decode(), "halfstep_images_generated_total",
                        'bundle="m",model="student"') == 3
    assert metric_value(b.render().decode(), "halfstep_images_generated_total",
                        'bundle="m",model="student"') == 0


def test_settings_precedence_flag_over_env_over_default():
    env = {"HALFSTEP_PORT": "9000", "HALFSTEP_MAX_BATCH": "16", "HALFSTEP_DRAIN_S": "5"}
    s = Settings.from_env(env, port=9100)
    assert (s.port, s.max_batch, s.drain_s, s.max_queue) == (9100, 16, 5.0, 256)


@pytest.mark.parametrize("env, needle", [
    ({"HALFSTEP_PORT": "eighty"}, "HALFSTEP_PORT"),
    ({"HALFSTEP_MAX_BATCH": "0"}, "max_batch"),
    ({"HALFSTEP_BACKEND": "tpu"}, "backend"),
    ({"HALFSTEP_TIMEOUT_S": "-1"}, "timeout_s"),
])
def test_bad_settings_say_what_is_allowed(env, needle):
    with pytest.raises(ValueError, match=needle):
        Settings.from_env(env)


def test_buckets_are_powers_of_two_up_to_max_batch():
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(1) == (1,)


def test_serve_is_registered_with_every_option(monkeypatch):
    args = build_parser().parse_args(["serve", "--max-batch", "8", "--drain-s", "3"])
    assert args.command == "serve" and args.max_batch == 8 and args.drain_s == 3.0
    assert args.bundle is None and args.port is None  # None: fall back to HALFSTEP_* / default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--api-key", "x"])  # env only, never a flag
