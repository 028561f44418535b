"""The scheduler cells of `halfstep bench`, measured over HTTP in the same run as the others.

mixed: C closed-loop clients send student requests (4 steps, n=1), first alone ("solo"), then
while one more client sends teacher requests (model=teacher, steps=T, n=64) back to back. The
teacher runs in chunks so that student batches get the engine in between; the target is the
student p99 under the teacher <= 3x the solo p50.

deadline: closed-loop student clients are raised 8 -> 16 -> ... until plain requests miss the
deadline (p50 or p99 over it). Under that same load (the plain clients keep running) a few
probe clients send the same request with deadline_ms: the server runs the largest student
predicted in time, or answers 503. The target is the share of probes answered 200 whose
client-measured latency is within the deadline. No load up to the cap missing the deadline
makes the target "not applicable on this machine", never met.

Every loop is bounded by a count and by the cell's wall-clock budget, like bench/http.py.
Statuses are counted, never retried away.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import httpx

from .http import CpuClock, histogram_sum_count, percentiles
from .targets import TARGET_DEADLINE_SHARE, TARGET_MIXED_P99, judge

TEACHER_N = 64  # images per teacher request (capped at the server's max_n)
RAMP_START = 8  # first client count of the deadline ramp; doubled up to the cap
DEADLINE_PROBES = 2  # clients sending deadline_ms requests under the plain load
TEACHER_HEAD_START_S = 0.5  # a refused teacher (422 over --max-request-s) answers within this
TEACHER_RETRY_CAP_S = 1.0  # longest pause after a teacher 503, whatever Retry-After says
SETTLE_LIMIT_S = 30.0  # most time spent waiting for a cancelled teacher run to stop
ERROR, CANCELLED = 0, -1  # Record.status for a transport error / a request cut at cell end


class Record(NamedTuple):
    """One request as the client saw it."""

    status: int  # HTTP status, or ERROR / CANCELLED
    latency_s: float
    steps: int | None = None  # X-Halfstep-Steps of a 200: the student that ran
    tagged: bool = False  # mixed: a teacher request was in flight when this one was sent


# -- pure summaries (tested without a server) -----------------------------------------------------


def status_counts(records: list[Record]) -> dict[str, int]:
    """{"200": 12, "503": 3, "error": 1, "cancelled": 1}, statuses in order."""
    names = {ERROR: "error", CANCELLED: "cancelled"}
    counts = Counter(r.status for r in records)
    return {names.get(s, str(s)): counts[s] for s in sorted(counts, key=lambda s: (s <= 0, s))}


def latency_stats(records: list[Record], limit_ms: float | None = None) -> dict:
    """Percentiles over the requests answered 200, every status counted, and (with limit_ms)
    the share of the 200s slower than limit_ms."""
    ok = [r.latency_s for r in records if r.status == 200]
    out = {**percentiles(ok), "sent": len(records), "statuses": status_counts(records)}
    if limit_ms is not None:
        over = sum(1 for t in ok if 1e3 * t > limit_ms)
        out["over_limit_share"] = round(over / len(ok), 4) if ok else None
    return out


def misses(row: dict, limit_ms: float) -> bool:
    """Plain requests at this load miss the deadline: their p50 or p99 is over it."""
    return any(row.get(k) is not None and row[k] > limit_ms for k in ("p50_ms", "p99_ms"))


def ramp_levels(start: int, cap: int) -> list[int]:
    """start, 2 x start, ... up to cap, with cap itself last: (8, 64) -> [8, 16, 32, 64]."""
    levels, c = [], min(start, cap)
    while c < cap:
        levels.append(c)
        c *= 2
    return levels + [cap]


async def ramp(levels: list[int], measure: Callable[[int], Awaitable[dict]],
               limit_ms: float) -> tuple[list[dict], dict | None]:
    """Measure each load in turn until one misses limit_ms: (every row measured, that row or
    None when no load up to the last one missed)."""
    rows = []
    for clients in levels:
        row = await measure(clients)
        rows.append(row)
        if misses(row, limit_ms):
            return rows, row
    return rows, None


def deadline_summary(records: list[Record], deadline_ms: float) -> dict:
    """What the deadline requests got: the share of 200s within the deadline (client-measured;
    the target), the share refused with 503 (reported, not part of the target) and which
    student ran, from X-Halfstep-Steps."""
    ok = [r for r in records if r.status == 200]
    in_time = sum(1 for r in ok if 1e3 * r.latency_s <= deadline_ms)
    refused = sum(1 for r in records if r.status == 503)
    steps = Counter(r.steps for r in ok)
    return {"sent": len(records), "statuses": status_counts(records), "answered": len(ok),
            "in_time": in_time, "in_time_share": round(in_time / len(ok), 4) if ok else None,
            "refused_503_share": round(refused / len(records), 4) if records else None,
            "steps_ran": {str(s): steps[s] for s in sorted(steps, key=lambda s: s or 0)},
            **{k: v for k, v in percentiles([r.latency_s for r in ok]).items() if k != "n"}}


def mixed_target(cell: dict | None) -> dict:
    """Student p99 with the teacher in flight / student p50 alone, or why it has no value."""
    if not cell:
        return judge(None, TARGET_MIXED_P99, False, "4-step p99 under a teacher / p50 alone",
                     "cell not run")
    detail = (f"{cell['steps']}-step p99 while teacher n={cell['teacher_n']} x "
              f"{cell['teacher_steps']} steps ran / p50 alone, {cell['clients']} clients")
    solo, mixed = cell.get("solo") or {}, cell.get("mixed") or {}
    if cell.get("skipped"):
        return judge(None, TARGET_MIXED_P99, False, detail, cell["skipped"])
    if not solo.get("p50_ms") or mixed.get("p99_ms") is None:
        why = "no student request answered 200 " + ("alone" if not solo.get("p50_ms") else
                                                     "while a teacher request was in flight")
        return judge(None, TARGET_MIXED_P99, False, detail, why)
    return judge(mixed["p99_ms"] / solo["p50_ms"], TARGET_MIXED_P99, False, detail)


def deadline_target(cell: dict | None) -> dict:
    """The share of deadline requests answered 200 in time, or why it has no value."""
    if not cell:
        return judge(None, TARGET_DEADLINE_SHARE, True, "deadline requests in time",
                     "cell not run")
    d = cell["deadline_ms"]
    if not cell.get("applicable"):
        return judge(None, TARGET_DEADLINE_SHARE, True,
                     f"deadline_ms={d} requests answered 200 within {d} ms",
                     f"not applicable on this machine: {cell['reason']}")
    p = cell["probes"]
    detail = (f"deadline_ms={d} requests answered 200 within {d} ms, client-measured, under "
              f"{cell['clients']} plain clients; {p['answered']} answered, 503 share "
              f"{p['refused_503_share']}")
    if p["in_time_share"] is None:
        return judge(None, TARGET_DEADLINE_SHARE, True, detail,
                     f"no deadline request answered 200: {p['statuses']}")
    return judge(p["in_time_share"], TARGET_DEADLINE_SHARE, True, detail)


# -- the load generator ---------------------------------------------------------------------------


def http_client(url: str, api_key: str | None, connections: int,
                timeout: float | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout,
                             limits=httpx.Limits(max_connections=connections))


async def send(http: httpx.AsyncClient, params: dict, tagged: bool = False) -> Record:
    """POST /generate once; a transport error or client timeout is a Record too."""
    started = time.perf_counter()
    try:
        r = await http.post("/generate", params=params)
    except httpx.HTTPError:
        return Record(ERROR, time.perf_counter() - started, None, tagged)
    steps = r.headers.get("x-halfstep-steps") if r.status_code == 200 else None
    return Record(r.status_code, time.perf_counter() - started,
                  int(steps) if steps else None, tagged)


async def closed_loop(http: httpx.AsyncClient, params: Callable[[int], dict], clients: int,
                      count: int | None, budget_s: float, *, stop: asyncio.Event | None = None,
                      tag: Callable[[], bool] | None = None,
                      pause_after_503_s: float = 0.0) -> list[Record]:
    """`clients` workers, each sending its next request when its last one was answered, until
    `count` requests were sent (None: no count), `budget_s` passed or `stop` is set. A request
    in flight at the end is answered, not cut. params(i) is the query of request i."""
    records: list[Record] = []
    left = [count]
    seq = itertools.count()
    deadline = time.monotonic() + budget_s

    async def worker() -> None:
        while time.monotonic() < deadline and not (stop and stop.is_set()):
            if left[0] is not None:
                if left[0] <= 0:
                    return
                left[0] -= 1
            record = await send(http, params(next(seq)), bool(tag and tag()))
            records.append(record)
            if record.status == 503 and pause_after_503_s:
                await asyncio.sleep(pause_after_503_s)  # a refusal must not become a busy loop

    await asyncio.gather(*(worker() for _ in range(clients)))
    return records


class TeacherLoad:
    """One client sending teacher requests back to back until cancelled. A 4xx means this
    server will not run the request at all (over --max-request-s, the teacher turned off or
    capped): it stops, with the reason, instead of repeating it."""

    def __init__(self, http: httpx.AsyncClient, params: dict) -> None:
        self.http, self.params = http, params
        self.records: list[Record] = []
        self.in_flight = False
        self.refusal: str | None = None

    async def run(self) -> None:
        for i in itertools.count():
            started = time.perf_counter()
            self.in_flight = True
            try:
                r = await self.http.post("/generate", params={**self.params, "seed": i})
            except asyncio.CancelledError:  # the cell ended with this request in flight
                self.records.append(Record(CANCELLED, time.perf_counter() - started))
                raise
            except httpx.HTTPError:
                self.records.append(Record(ERROR, time.perf_counter() - started))
                await asyncio.sleep(0.1)
                continue
            finally:
                self.in_flight = False
            self.records.append(Record(r.status_code, time.perf_counter() - started))
            if 400 <= r.status_code < 500:
                self.refusal = f"HTTP {r.status_code}: {_error_text(r)}"
                return
            if r.status_code == 503:
                await asyncio.sleep(min(_retry_after(r), TEACHER_RETRY_CAP_S))


def _error_text(r: httpx.Response) -> str:
    try:
        return str(r.json().get("error", r.text))[:300]
    except ValueError:
        return r.text[:300]


def _retry_after(r: httpx.Response) -> float:
    try:
        return float(r.headers.get("retry-after", "1"))
    except ValueError:
        return 1.0


async def settle(http: httpx.AsyncClient, limit_s: float = SETTLE_LIMIT_S) -> float:
    """Wait until the server's batch count has not moved for longer than its slowest recent
    batch (a cancelled teacher run stops only at its next chunk boundary), at most limit_s, so
    whatever runs next does not share the engine with it. Seconds waited."""
    started = time.monotonic()
    last, still_since = None, started
    while time.monotonic() - started < limit_s:
        try:
            text = (await http.get("/metrics")).text
        except httpx.HTTPError:
            break
        count = histogram_sum_count(text, "halfstep_batch_duration_seconds")[1]
        now = time.monotonic()
        if count != last:
            last, still_since = count, now
        elif now - still_since > 0.5 + 1.5 * _slowest_recent_batch_s(text):
            break
        await asyncio.sleep(0.2)
    return round(time.monotonic() - started, 2)


def _slowest_recent_batch_s(metrics_text: str) -> float:
    """The largest per-lane last-batch time (halfstep_lane_batch_seconds; a teacher chunk for
    the teacher lane), 2 s when the server does not export it."""
    values = [float(line.rsplit(None, 1)[1]) for line in metrics_text.splitlines()
              if line.startswith("halfstep_lane_batch_seconds")]
    return min(max(values), SETTLE_LIMIT_S) if values else 2.0


# -- the two cells --------------------------------------------------------------------------------


def server_args(budget_s: float) -> tuple[str, ...]:
    """Flags for a server the bench starts itself, so that the mixed cell's teacher request
    is admitted and not cut: a teacher n=64 x 256 steps on a 2-core CPU is minutes of
    predicted engine time (over the default --max-request-s 60: 422) and would 504 after the
    default --timeout-s 30. The cell budget bounds it instead (cancelled at the cell's end)."""
    return ("--max-request-s", "86400", "--timeout-s", f"{min(3600.0, max(30.0, 2 * budget_s)):g}")


async def run_mixed(url: str, api_key: str | None, steps: int, clients: int,
                    teacher_steps: int, teacher_n: int, solo_count: int, mixed_count: int,
                    budget_s: float, progress=print) -> dict:
    """The mixed cell: student load alone, then with the teacher requests running."""
    out = {"steps": steps, "clients": clients, "teacher_steps": teacher_steps,
           "teacher_n": teacher_n, "solo_count": solo_count, "mixed_count": mixed_count}

    def student(i: int) -> dict:
        return {"steps": steps, "n": 1, "seed": i}

    teacher_params = {"model": "teacher", "steps": teacher_steps, "n": teacher_n}
    async with http_client(url, api_key, clients, max(60.0, budget_s)) as http, \
            http_client(url, api_key, 1, None) as teacher_http:  # cancelled, never timed out
        await send(http, student(0))  # untimed warm request
        progress(f"bench: mixed, {clients} clients x {steps}-step requests alone")
        with CpuClock() as clock:
            solo = await closed_loop(http, student, clients, solo_count, budget_s)
        out["solo"] = {**latency_stats(solo), **clock.result()}
        progress(f"bench: mixed, the same with teacher n={teacher_n} x {teacher_steps} steps "
                 "back to back")
        teacher = TeacherLoad(teacher_http, teacher_params)
        task = asyncio.create_task(teacher.run())
        try:
            await asyncio.sleep(TEACHER_HEAD_START_S)
            if task.done():
                task.result()  # an unexpected failure of the teacher client propagates
                out["skipped"] = f"teacher request refused: {teacher.refusal}"
            else:
                with CpuClock() as clock:
                    mixed = await closed_loop(http, student, clients, mixed_count, budget_s,
                                              tag=lambda: teacher.in_flight)
                # the p99 counts only requests sent while a teacher request was in flight
                # (sent and not yet answered: queued on the server or running its chunks)
                out["mixed"] = {**latency_stats([r for r in mixed if r.tagged]),
                                "sent_all": len(mixed), "statuses_all": status_counts(mixed),
                                **clock.result()}
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()
        done = [r.latency_s for r in teacher.records if r.status == 200]
        out["teacher"] = {"completed": len(done), "statuses": status_counts(teacher.records),
                          "refusal": teacher.refusal,
                          "p50_ms": percentiles(done)["p50_ms"]}
        if teacher.refusal and not out.get("skipped"):
            out["teacher"]["note"] = "the teacher stopped during the cell: see refusal"
        out["settle_s"] = await settle(http)
    return out


async def run_deadline(url: str, api_key: str | None, steps: int, deadline_ms: int,
                       levels: list[int], requests: int, budget_s: float,
                       progress=print) -> dict:
    """The deadline cell: the ramp of plain load, then deadline probes under the first load
    that missed the deadline."""
    def plain(i: int) -> dict:
        return {"steps": steps, "n": 1, "seed": i}

    def probe(i: int) -> dict:
        return {"steps": steps, "n": 1, "seed": i, "deadline_ms": deadline_ms}

    out: dict = {"deadline_ms": deadline_ms, "steps": steps, "levels": levels}
    async with http_client(url, api_key, max(levels) + DEADLINE_PROBES,
                           max(60.0, budget_s)) as http:
        await send(http, plain(0))  # untimed warm request

        async def measure(clients: int) -> dict:
            count = max(4 * requests, 4 * clients)
            progress(f"bench: deadline ramp, {clients} clients x plain {steps}-step requests "
                     f"({count} requests)")
            with CpuClock() as clock:
                records = await closed_loop(http, plain, clients, count, budget_s)
            return {"clients": clients, **latency_stats(records, deadline_ms), **clock.result()}

        out["ramp"], found = await ramp(levels, measure, deadline_ms)
        if found is None:
            top = out["ramp"][-1]
            out.update(applicable=False, reason=(
                f"plain {steps}-step requests met {deadline_ms} ms at every load up to "
                f"{top['clients']} clients (there p50 {top['p50_ms']} ms, p99 {top['p99_ms']} ms)"))
            return out
        clients, count = found["clients"], max(10 * requests, 50)
        progress(f"bench: deadline, {DEADLINE_PROBES} clients x deadline_ms={deadline_ms} under "
                 f"{clients} plain clients ({count} requests)")
        stop = asyncio.Event()
        with CpuClock() as clock:
            load = asyncio.create_task(closed_loop(http, plain, clients, None, budget_s,
                                                   stop=stop))
            try:
                # a refused probe waits one deadline before its next try; Retry-After (>= 1 s)
                # is recorded by the status count but not honoured, to keep sampling the load
                probes = await closed_loop(http, probe, DEADLINE_PROBES, count, budget_s,
                                           pause_after_503_s=deadline_ms / 1e3)
            finally:
                stop.set()
                background = await load
        out.update(applicable=True, clients=clients, probe_clients=DEADLINE_PROBES,
                   probes=deadline_summary(probes, deadline_ms),
                   load=latency_stats(background, deadline_ms), **clock.result())
    return out


async def run_cells(url: str, api_key: str | None, *, steps: int, deadline_ms: int,
                    max_clients: int, mixed: bool, mixed_clients: int, teacher_steps: int,
                    teacher_n: int, requests: int, budget_s: float, progress=print) -> dict:
    """Both cells against one server: deadline first, mixed last (a cancelled teacher run may
    still finish its chunk; settle() waits for it, and nothing HTTP follows it)."""
    out = {}
    if deadline_ms:
        out["deadline"] = await run_deadline(url, api_key, steps, deadline_ms,
                                             ramp_levels(RAMP_START, max_clients), requests,
                                             budget_s, progress)
    if mixed:
        out["mixed"] = await run_mixed(
            url, api_key, steps, mixed_clients, teacher_steps, teacher_n,
            solo_count=max(2 * requests, 2 * mixed_clients),
            mixed_count=max(5 * requests, 4 * mixed_clients), budget_s=budget_s,
            progress=progress)
    return out
