"""The soak test (bench/soak.py): a short run against the tiny bundle, and its guards."""

from __future__ import annotations

import json
import os

import pytest

from halfstep.bench.soak import format_table, main, rss_bytes

REPORT_FIELDS = ("requests_sent", "ok_200", "other_statuses", "client_cancelled",
                 "connection_errors", "timeouts", "unanswered_at_deadline", "lost", "p50_ms",
                 "p99_ms", "rss_60s_mb", "rss_end_mb", "rss_growth_pct", "rss_samples", "checks",
                 "passed")


def test_rss_of_this_process_is_readable():
    assert rss_bytes(os.getpid()) > 1 << 20


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com:80"])
def test_non_loopback_url_is_refused(url, capsys):
    assert main(["--url", url, "--duration-s", "1"]) == 2
    assert "non-loopback" in capsys.readouterr().err


@pytest.mark.parametrize("flag", [["--duration-s", "0"], ["--duration-s", "99999"],
                                  ["--clients", "0"], ["--cancel-fraction", "1"]])
def test_unbounded_or_bad_settings_are_refused(flag):
    assert main(["--url", "http://127.0.0.1:1", *flag]) == 2


def test_short_soak_against_tiny_bundle(tiny_bundle_dir, tmp_path, capsys):
    out = tmp_path / "soak.json"
    main(["--bundle", str(tiny_bundle_dir), "--backend", "torch", "--duration-s", "8",
          "--clients", "4", "--cancel-fraction", "0.2", "--json", str(out)])
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    assert all(k in r for k in REPORT_FIELDS)
    assert r["other_statuses"].get("500", 0) == 0 and r["checks"]["no_500"]
    assert r["lost"] == 0 and r["checks"]["none_lost"], r.get("server_log_tail")
    assert r["requests_sent"] == r["ok_200"] + sum(r["other_statuses"].values()) \
        + r["client_cancelled"]
    assert r["ok_200"] > 0 and r["client_cancelled"] > 0
    assert 0 < r["p50_ms"] <= r["p99_ms"]
    assert len(r["rss_samples"]) >= 5 and r["rss_end_mb"] > 0
    assert r["server_alive_at_end"] and 6 <= r["seconds"] < 60
    assert "PASS: no 500" in table and "PASS: no request lost" in table
    assert format_table(r) in table
