"""`halfstep bench`'s scheduler cells (bench/mixed.py): the summaries, the ramp, the targets and
their lines, the load generator on a fake transport, and one small run against the tiny bundle.

Nothing here asserts a latency: the machine is shared, so only counts, shapes and the
arithmetic on given numbers are checked.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from halfstep.bench import mixed
from halfstep.bench.cli import format_table
from halfstep.bench.http import CpuClock, LocalServer, cpu_share
from halfstep.bench.mixed import CANCELLED, ERROR, Record
from halfstep.bench.run import BenchConfig
from halfstep.bench.targets import format_target, judge
from halfstep.cli import build_parser

# -- targets: the ratio and its line ---------------------------------------------------------------


def _mixed_cell(solo_p50, mixed_p99, **extra) -> dict:
    return {"steps": 4, "clients": 16, "teacher_steps": 256, "teacher_n": 64,
            "solo": {"p50_ms": solo_p50}, "mixed": {"p99_ms": mixed_p99}, **extra}


def test_mixed_ratio_is_p99_under_teacher_over_solo_p50():
    met = mixed.mixed_target(_mixed_cell(100.0, 250.0))
    assert (met["value"], met["met"], met["want"], met["goal"]) == (2.5, True, "<=", 3.0)
    assert format_target("mixed", met).endswith(") met")
    missed = mixed.mixed_target(_mixed_cell(100.0, 400.0))
    assert (missed["value"], missed["met"], missed["missed_by_x"]) == (4.0, False, 1.33)
    assert format_target("mixed", missed).endswith("NOT met (missed by 1.33x)")
    edge = mixed.mixed_target(_mixed_cell(100.0, 300.0))  # exactly 3x: met (<=)
    assert edge["met"]


@pytest.mark.parametrize("cell, why", [
    (_mixed_cell(100.0, 200.0, skipped="teacher request refused: HTTP 422: too long"),
     "teacher request refused: HTTP 422"),
    (_mixed_cell(None, 200.0), "no student request answered 200 alone"),
    (_mixed_cell(100.0, None), "while a teacher request was in flight"),
    (None, "cell not run"),
])
def test_mixed_target_without_a_value_is_never_met(cell, why):
    t = mixed.mixed_target(cell)
    assert t["value"] is None and t["met"] is False
    line = format_target("mixed_p99_vs_solo_p50", t)
    assert line.startswith("target mixed_p99_vs_solo_p50: - (want <= 3.0;")
    assert "NOT met (" in line and why in line


def test_judge_higher_is_better_and_a_zero_value():
    assert judge(0.995, 0.99, True, "d")["met"]
    zero = judge(0.0, 0.99, True, "d")
    assert zero["met"] is False and zero["missed_by_x"] is None
    assert format_target("x", zero) == "target x: 0.0 (want >= 0.99; d) NOT met"
    json.dumps(zero, allow_nan=False)  # a result file must stay strict JSON


# -- the deadline share ---------------------------------------------------------------------------


def test_deadline_summary_counts_in_time_among_the_200s():
    records = [Record(200, 0.050, 4), Record(200, 0.100, 2), Record(200, 0.101, 4),
               Record(200, 0.030, 1), Record(503, 0.002), Record(503, 0.003),
               Record(504, 0.100), Record(ERROR, 1.0)]
    s = mixed.deadline_summary(records, 100)
    assert (s["sent"], s["answered"], s["in_time"]) == (8, 4, 3)  # 100 ms exactly is in time
    assert s["in_time_share"] == 0.75
    assert s["refused_503_share"] == 0.25  # of all sent; not part of the target
    assert s["steps_ran"] == {"1": 1, "2": 1, "4": 2}
    assert s["statuses"] == {"200": 4, "503": 2, "504": 1, "error": 1}
    t = mixed.deadline_target({"deadline_ms": 100, "applicable": True, "clients": 16,
                               "probes": s})
    assert (t["value"], t["met"], t["want"], t["goal"]) == (0.75, False, ">=", 0.99)
    assert "missed by 1.32x" in format_target("deadline", t)


def test_deadline_target_all_in_time_all_refused_and_not_applicable():
    fine = mixed.deadline_summary([Record(200, 0.02, 4)] * 99 + [Record(503, 0.001)], 100)
    t = mixed.deadline_target({"deadline_ms": 100, "applicable": True, "clients": 8,
                               "probes": fine})
    assert t["value"] == 1.0 and t["met"]
    refused = mixed.deadline_summary([Record(503, 0.001)] * 5, 100)
    assert refused["in_time_share"] is None and refused["refused_503_share"] == 1.0
    t = mixed.deadline_target({"deadline_ms": 100, "applicable": True, "clients": 8,
                               "probes": refused})
    assert t["value"] is None and not t["met"]
    assert "no deadline request answered 200" in format_target("d", t)
    na = mixed.deadline_target({"deadline_ms": 100, "applicable": False,
                                "reason": "met 100 ms at every load up to 64 clients"})
    assert na["value"] is None and not na["met"]
    assert "NOT met (not applicable on this machine: met 100 ms" in format_target("d", na)


def test_latency_stats_use_the_200s_only_and_count_every_status():
    records = [Record(200, 0.01 * i) for i in range(1, 11)] + [Record(503, 5.0),
                                                              Record(CANCELLED, 9.0)]
    s = mixed.latency_stats(records, limit_ms=50)
    assert (s["n"], s["sent"], s["p50_ms"], s["p99_ms"]) == (10, 12, 50.0, 100.0)
    assert s["over_limit_share"] == 0.5  # 60..100 ms of the ten 200s
    assert s["statuses"] == {"200": 10, "503": 1, "cancelled": 1}
    assert mixed.latency_stats([Record(503, 1.0)], 50)["over_limit_share"] is None


# -- the load ramp --------------------------------------------------------------------------------


def test_ramp_levels():
    assert mixed.ramp_levels(8, 64) == [8, 16, 32, 64]
    assert mixed.ramp_levels(8, 48) == [8, 16, 32, 48]
    assert mixed.ramp_levels(8, 8) == [8]
    assert mixed.ramp_levels(8, 4) == [4]


def _fake_measure(table: dict[int, tuple], seen: list[int]):
    async def measure(clients: int) -> dict:
        seen.append(clients)
        p50, p99 = table[clients]
        return {"clients": clients, "p50_ms": p50, "p99_ms": p99}
    return measure


def test_ramp_stops_at_the_first_load_that_misses():
    seen: list[int] = []
    table = {8: (40, 90), 16: (70, 100), 32: (90, 180), 64: (150, 300)}
    rows, found = asyncio.run(mixed.ramp([8, 16, 32, 64], _fake_measure(table, seen), 100))
    assert seen == [8, 16, 32]  # 100 ms exactly is not a miss; p99 alone over it is
    assert found["clients"] == 32 and [r["clients"] for r in rows] == [8, 16, 32]


def test_ramp_without_a_miss_reports_none():
    seen: list[int] = []
    table = {8: (10, 20), 16: (None, None), 32: (30, 99)}  # a level with no 200s is no miss
    rows, found = asyncio.run(mixed.ramp([8, 16, 32], _fake_measure(table, seen), 100))
    assert found is None and seen == [8, 16, 32] and len(rows) == 3


# -- the load generator's CPU share ---------------------------------------------------------------


def test_cpu_share():
    assert cpu_share(0.5, 2.0) == 0.25
    assert cpu_share(3.0, 2.0) == 1.5  # more than one core: threads
    assert cpu_share(1.0, 0.0) is None
    with CpuClock() as clock:
        sum(i * i for i in range(20_000))
    r = clock.result()
    assert set(r) == {"wall_s", "client_cpu_s", "client_cpu"}
    assert r["client_cpu_s"] >= 0 and r["wall_s"] >= 0


# -- the load generator on a fake transport -------------------------------------------------------


def _fake_server(statuses: list[int], seen: list[dict]) -> httpx.AsyncClient:
    """Answers /generate with the next status of `statuses` (then 200), echoing steps."""
    answers = iter(statuses)

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(dict(request.url.params))
        status = next(answers, 200)
        headers = {"X-Halfstep-Steps": request.url.params.get("steps", "4"),
                   "Retry-After": "1"}
        body = {"error": "teacher steps=64 is over this server's limit"} if status == 422 else {}
        return httpx.Response(status, json=body, headers=headers)

    return httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


def test_closed_loop_is_bounded_by_its_count_and_records_every_status():
    seen: list[dict] = []

    async def go():
        async with _fake_server([200, 503, 200], seen) as http:
            return await mixed.closed_loop(http, lambda i: {"steps": 4, "seed": i}, clients=3,
                                           count=7, budget_s=60.0, pause_after_503_s=0.001)

    records = asyncio.run(go())
    assert len(records) == 7 and len(seen) == 7
    assert sorted(int(p["seed"]) for p in seen) == list(range(7))  # each request its own seed
    assert mixed.status_counts(records) == {"200": 6, "503": 1}
    assert {r.steps for r in records if r.status == 200} == {4}
    assert all(r.steps is None for r in records if r.status != 200)


def test_closed_loop_without_a_count_stops_when_told():
    seen: list[dict] = []

    async def go():
        stop = asyncio.Event()

        def handler(request: httpx.Request) -> httpx.Response:
            seen.append(dict(request.url.params))
            if len(seen) == 5:
                stop.set()  # the workers finish what they sent and send nothing more
            return httpx.Response(200, headers={"X-Halfstep-Steps": "4"})

        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=transport) as http:
            return await mixed.closed_loop(http, lambda i: {"steps": 4}, 2, None, 60.0, stop=stop)

    records = asyncio.run(go())
    assert 5 <= len(records) <= 6 and all(r.status == 200 and r.steps == 4 for r in records)


def test_teacher_load_stops_at_a_refusal_and_says_why():
    seen: list[dict] = []

    async def go():
        async with _fake_server([200, 422], seen) as http:
            load = mixed.TeacherLoad(http, {"model": "teacher", "steps": 64, "n": 64})
            await asyncio.wait_for(load.run(), 10)
            return load

    load = asyncio.run(go())
    assert [r.status for r in load.records] == [200, 422] and len(seen) == 2
    assert load.refusal.startswith("HTTP 422: teacher steps=64") and not load.in_flight
    assert [p["seed"] for p in seen] == ["0", "1"] and seen[0]["n"] == "64"


def test_teacher_load_cancelled_in_flight_is_recorded():
    async def go():
        started = asyncio.Event()

        async def slow(request: httpx.Request) -> httpx.Response:
            started.set()
            await asyncio.sleep(60)
            return httpx.Response(200)

        transport = httpx.MockTransport(slow)
        async with httpx.AsyncClient(base_url="http://127.0.0.1:1", transport=transport) as http:
            load = mixed.TeacherLoad(http, {"model": "teacher"})
            task = asyncio.create_task(load.run())
            await started.wait()
            assert load.in_flight
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return load

    load = asyncio.run(go())
    assert mixed.status_counts(load.records) == {"cancelled": 1} and not load.in_flight


# -- configuration, flags and the table -----------------------------------------------------------


def test_config_and_flags():
    quick = BenchConfig(url="http://127.0.0.1:1", quick=True)
    assert quick.mixed and quick.deadline_ms == 100 and quick.deadline_max_clients == 32
    full = BenchConfig(url="http://127.0.0.1:1")
    assert (full.mixed_clients, full.deadline_max_clients) == (16, 64)
    with pytest.raises(ValueError, match="deadline-ms"):
        BenchConfig(url="http://127.0.0.1:1", deadline_ms=-1)
    with pytest.raises(ValueError, match="mixed-clients"):
        BenchConfig(url="http://127.0.0.1:1", mixed_clients=0)
    args = build_parser().parse_args(["bench", "--url", "http://127.0.0.1:1", "--no-mixed",
                                      "--deadline-ms", "0", "--mixed-clients", "4"])
    assert (args.mixed, args.deadline_ms, args.mixed_clients) == (False, 0, 4)
    args = build_parser().parse_args(["bench", "--url", "http://127.0.0.1:1"])
    assert (args.mixed, args.deadline_ms) == (True, 100)
    assert mixed.server_args(60.0) == ("--max-request-s", "86400", "--timeout-s", "120")
    assert mixed.server_args(5.0)[-1] == "30"  # never below the server's default


def test_table_prints_the_new_rows_and_why_a_target_has_no_value():
    deadline = {"deadline_ms": 100, "steps": 4, "applicable": False,
                "reason": "plain 4-step requests met 100 ms at every load up to 64 clients",
                "ramp": [{"clients": c, "p50_ms": 20.0, "p95_ms": 30.0, "p99_ms": 40.0,
                          "over_limit_share": 0.0, "client_cpu": 0.2} for c in (8, 64)]}
    cell = {**_mixed_cell(100.0, None, skipped="teacher request refused: HTTP 422: no"),
            "mixed": None,
            "solo": {"p50_ms": 100.0, "p95_ms": 110.0, "p99_ms": 120.0, "n": 32, "sent": 32,
                     "statuses": {"200": 32}, "client_cpu": 0.3},
            "teacher": {"completed": 0, "statuses": {"422": 1}, "refusal": "HTTP 422: no",
                        "p50_ms": None}}
    r = {"machine": {"device": "cpu", "platform": "p", "torch": "t", "load_average": None},
         "server": {"backend": "torch"}, "latency": [], "throughput": [], "skipped": {},
         "deadline": deadline, "mixed": cell}
    r["targets"] = {"mixed_p99_vs_solo_p50": mixed.mixed_target(cell),
                    "deadline_in_time_share": mixed.deadline_target(deadline)}
    table = format_table(r)
    assert "deadline    plain, 64 clients" in table and "0.0% over 100ms" in table
    assert "mixed       16 clients alone" in table and "+ teacher" not in table
    assert "deadline: not applicable on this machine: plain 4-step" in table
    assert "refused: HTTP 422: no" in table
    assert "client cpu (bench process CPU s / wall s; 1.0 = one core): ramp c=8 0.2" in table
    assert "target deadline_in_time_share: - (want >= 0.99;" in table
    assert "NOT met (teacher request refused: HTTP 422: no)" in table


# -- one small run against the tiny bundle --------------------------------------------------------


def test_scheduler_cells_against_tiny_bundle(tiny_bundle_dir):
    """Both cells, then a teacher the server refuses (the tiny bundle allows 16 steps): the
    cell says so instead of measuring without a teacher. Counts only, never latencies."""
    with LocalServer(str(tiny_bundle_dir), "torch", extra_args=mixed.server_args(5.0)) as srv:
        out = asyncio.run(mixed.run_cells(
            srv.url, None, steps=4, deadline_ms=100, max_clients=16, mixed=True,
            mixed_clients=4, teacher_steps=16, teacher_n=8, requests=2, budget_s=5.0,
            progress=lambda m: None))
        refused = asyncio.run(mixed.run_mixed(srv.url, None, 4, 2, 64, 8, 4, 4, 5.0,
                                              progress=lambda m: None))
    json.dumps(out, allow_nan=False)
    d, m = out["deadline"], out["mixed"]
    assert d["levels"] == [8, 16] and 1 <= len(d["ramp"]) <= 2
    for row in d["ramp"]:
        assert row["sent"] <= max(4 * 2, 4 * row["clients"]) and row["statuses"].get("200")
        assert row["client_cpu"] is not None
    if d["applicable"]:  # depends on how loaded the machine is; both branches are valid
        p = d["probes"]
        assert 1 <= p["sent"] <= 50 and sum(p["statuses"].values()) == p["sent"]
        assert set(p["steps_ran"]) <= {"1", "2", "4"}
        assert p["answered"] == p["statuses"].get("200", 0)
    else:
        assert "at every load up to 16 clients" in d["reason"]
    assert m["solo"]["sent"] == 8 and m["solo"]["statuses"] == {"200": 8}
    assert not m.get("skipped") and m["teacher"]["refusal"] is None
    assert m["mixed"]["sent_all"] <= 16 and m["mixed"]["sent"] <= m["mixed"]["sent_all"]
    assert set(m["teacher"]["statuses"]) <= {"200", "cancelled"}
    assert m["teacher"]["completed"] == m["teacher"]["statuses"].get("200", 0)
    assert mixed.mixed_target(m)["detail"].startswith("4-step p99 while teacher n=8 x 16")
    assert refused["skipped"].startswith("teacher request refused: HTTP 422")
    assert refused["teacher"]["statuses"] == {"422": 1} and "mixed" not in refused
    t = mixed.mixed_target(refused)
    assert t["value"] is None and not t["met"]
