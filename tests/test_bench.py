"""`halfstep bench`: a small real run against the tiny bundle, and the loopback guard."""

from __future__ import annotations

import json

import pytest

from halfstep.bench.http import check_url, histogram_sum_count, percentiles
from halfstep.bench.run import BenchConfig, plan_steps
from halfstep.cli import main


@pytest.mark.parametrize("url", ["http://10.0.0.1:8000", "http://example.com",
                                 "https://192.168.1.5:443", "http://[2001:db8::1]:80"])
def test_non_loopback_is_refused_without_allow_remote(url):
    with pytest.raises(ValueError, match="--allow-remote"):
        check_url(url)
    assert check_url(url + "/", allow_remote=True) == url


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "http://localhost:1/",
                                 "http://[::1]:8000", "http://127.1.2.3:9"])
def test_loopback_is_accepted(url):
    assert check_url(url) == url.rstrip("/")


@pytest.mark.parametrize("url", ["ftp://127.0.0.1", "127.0.0.1:8000", "http://127.0.0.1/generate"])
def test_malformed_url_is_refused(url):
    with pytest.raises(ValueError):
        check_url(url)


def test_cli_refuses_remote_before_sending_anything(capsys):
    # Nothing listens at 10.255.255.1; the refusal must come first (exit 2, one line).
    assert main(["bench", "--url", "http://10.255.255.1:8000", "--quick"]) == 2
    assert "--allow-remote" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="--url"):
        BenchConfig()
    with pytest.raises(ValueError, match="requests"):
        BenchConfig(url="http://127.0.0.1:1", requests=0)
    quick = BenchConfig(url="http://127.0.0.1:1", quick=True)
    assert quick.steps == (1, 4) and quick.requests <= 5 and quick.cell_budget_s <= 10


def test_plan_steps_benches_only_what_exists():
    info = {"student_steps": [1, 2, 4, 8], "teacher_max_steps": 64}
    students, teacher, skipped = plan_steps(info, (1, 2, 4, 8, 16))
    assert students == [1, 2, 4, 8]
    assert teacher == [1, 2, 4, 8, 64]
    assert "student 16" in skipped and "teacher 256" in skipped
    # the server's own teacher cap (--max-teacher-steps, or the bundle's default) wins
    _, teacher, skipped = plan_steps({**info, "teacher_limit": 16}, (1, 2))
    assert teacher == [1, 2, 16] and "limit is 16" in skipped["teacher 256"]
    _, teacher, skipped = plan_steps({**info, "teacher_limit": 0}, (1, 2))
    assert teacher == [] and "turned off" in skipped["teacher"]


def test_percentiles_and_metrics_parsing():
    p = percentiles([0.001 * i for i in range(1, 101)])
    assert (p["p50_ms"], p["p95_ms"], p["p99_ms"], p["n"]) == (50.0, 95.0, 99.0, 100)
    assert percentiles([])["p50_ms"] is None
    text = "halfstep_batch_size_bucket{le=\"1.0\"} 3.0\nhalfstep_batch_size_count 4.0\n" \
           "halfstep_batch_size_sum 10.0\n"
    assert histogram_sum_count(text, "halfstep_batch_size") == (10.0, 4.0)


def test_quick_bench_against_tiny_bundle(tiny_bundle_dir, tmp_path, capsys):
    out, plot = tmp_path / "bench.json", tmp_path / "bench.png"
    rc = main(["bench", "--bundle", str(tiny_bundle_dir), "--backend", "torch", "--quick",
               "--steps", "1,16", "--teacher-steps", "2", "--requests", "2", "--repeats", "1",
               "--batches", "1,2", "--concurrency", "1,2", "--json", str(out),
               "--plot", str(plot)])
    assert rc == 0
    table = capsys.readouterr().out
    r = json.loads(out.read_text())
    # Measured cells: student 1 (16 does not exist: skipped and said so), teacher 1 and 2.
    assert [(x["model"], x["steps"]) for x in r["latency"]] == \
        [("student", 1), ("teacher", 1), ("teacher", 2)]
    assert "student 16" in r["skipped"]
    for x in r["latency"]:
        assert x["n"] >= 1 and x["errors"] == 0
        assert 0 < x["p50_ms"] <= x["p95_ms"] <= x["p99_ms"]
        # the server's own engine time per batch, read from /metrics over the same cell
        assert 0 < x["server_engine_ms"] < x["mean_ms"]
    assert [t["concurrency"] for t in r["throughput"]] == [1, 2]
    assert all(t["images_per_s"] > 0 and t["mean_batch"] >= 1 for t in r["throughput"])
    assert {(e["backend"], e["steps"], e["batch"]) for e in r["engines"]} >= \
        {("torch", 1, 1), ("torch", 1, 2)}
    assert all(0 < f["fraction"] and f["gflop"] > 0 for f in r["floor"])
    assert [d["steps"] for d in r["diffusers"]] == [1]
    assert r["server"]["backend"] == "torch"
    # the throughput target: concurrency 2 / the best of torch's batch 1 and 2 at 1 step
    best = max(e["batch"] / e["median_ms"] * 1e3 for e in r["engines"]
               if e["backend"] == "torch" and e["steps"] == 1)
    assert r["targets"]["throughput_vs_engine"]["value"] == \
        pytest.approx(r["throughput"][-1]["images_per_s"] / best, abs=1e-3)
    for line in ("http n=1", "throughput", "engine", "floor", "diffusers", "matmul rate",
                 "skipped student 16", "time split student 1"):
        assert line in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreachable_loopback_server_is_a_clear_error(capsys):
    from halfstep.bench.http import free_port

    assert main(["bench", "--url", f"http://127.0.0.1:{free_port()}", "--quick"]) == 2
    assert "cannot query" in capsys.readouterr().err


def test_throughput_targets_rising_and_vs_engine():
    from halfstep.bench.run import targets

    def result(rates):
        return {"server": {"backend": "onnxruntime"}, "latency": [],
                "engines": [{"backend": "onnxruntime", "steps": 4, "batch": 64,
                             "median_ms": 800.0}],  # 80 images/s
                "throughput": [{"concurrency": c, "steps": 4, "images_per_s": v}
                               for c, v in zip((1, 8, 32), rates)]}

    good = targets(result((50.0, 70.0, 75.0)))
    assert good["throughput_rising"]["met"] and good["throughput_vs_engine"]["value"] == 0.938
    bad = targets(result((60.0, 74.0, 70.0)))
    assert not bad["throughput_rising"]["met"]
    assert "32 vs 8 clients" in bad["throughput_rising"]["detail"]
    assert not bad["throughput_vs_engine"]["met"]  # 70 / 80 = 0.875 < 0.9
