"""`python -m halfstep.bench.soak`: a bounded soak test of one loopback server.

C closed-loop clients send `POST /generate?steps=S&n=1&seed=...` for a fixed time; a random
fraction of the requests is cancelled by the client a few milliseconds in. The server's resident
memory is sampled every second. The report counts every request by outcome and checks three
things: no 500, no request lost (each one not cancelled by the client got an HTTP answer), and
RSS growth after the first minute within a bound. Everything is bounded: the load stops at the
duration, in-flight requests get a grace period, and a watchdog ends the process and the server
if even that is exceeded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from halfstep.server.client import AsyncClient, HalfstepError

from . import http as bench_load

MAX_DURATION_S = 3600.0
MAX_CLIENTS = 256
BASELINE_S = 60.0  # RSS growth is measured from here (the first minute is warm-up)
MAX_GROWTH_PCT = 5.0
CANCEL_AFTER_S = (0.002, 0.020)  # a cancelled request is abandoned this long after it starts


def rss_bytes(pid: int) -> int | None:
    """Resident set size of `pid` (psutil when installed, else /proc); None if unreadable."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return psutil.Process(pid).memory_info().rss
        except psutil.Error:
            return None
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return None


class RssSampler(threading.Thread):
    """Samples rss_bytes(pid) every `every_s` seconds into `samples` as (seconds, bytes)."""

    def __init__(self, pid: int, every_s: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int]] = []
        self.started = time.monotonic()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            rss = rss_bytes(self.pid)
            if rss is not None:
                self.samples.append((round(time.monotonic() - self.started, 2), rss))
            self.done.wait(self.every_s)

    def stop(self) -> list[tuple[float, int]]:
        self.done.set()
        self.join(timeout=5)
        return self.samples


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    statuses: Counter = field(default_factory=Counter)  # non-200 HTTP answers by status
    cancelled: int = 0  # abandoned by the client on purpose
    connection_errors: int = 0  # refused, reset or closed without an answer
    timeouts: int = 0  # no answer within the client's request timeout
    latencies: list[float] = field(default_factory=list)  # seconds, 200s only

    def unanswered(self) -> int:
        """Sent but never finished (still in flight when the hard deadline cut the run)."""
        return self.sent - self.ok - sum(self.statuses.values()) - self.cancelled \
            - self.connection_errors - self.timeouts


async def _client(client: AsyncClient, steps: int, end: float, cancel_fraction: float,
                  rng: random.Random, tally: Tally) -> None:
    """One closed-loop client: a new request as soon as the last one finished, until `end`."""
    while time.monotonic() < end:
        cancel_after = rng.uniform(*CANCEL_AFTER_S) if rng.random() < cancel_fraction else None
        call = client.generate(steps=steps, n=1, seed=rng.randrange(2**31))
        tally.sent += 1
        started = time.perf_counter()
        try:
            if cancel_after is None:
                await call
            else:
                await asyncio.wait_for(call, cancel_after)
        except TimeoutError:  # only wait_for raises this one: the client gave up on purpose
            tally.cancelled += 1
        except HalfstepError as exc:
            tally.statuses[exc.status] += 1
        except httpx.TimeoutException:
            tally.timeouts += 1
        except httpx.TransportError:
            tally.connection_errors += 1
        else:
            tally.ok += 1
            tally.latencies.append(time.perf_counter() - started)


async def _load(url: str, steps: int | None, clients: int, duration_s: float,
                cancel_fraction: float, request_timeout_s: float, seed: int,
                tally: Tally) -> int:
    """Run the clients; returns the steps used. Bounded by duration + request timeout + 5 s."""
    limits = httpx.Limits(max_connections=clients)
    async with AsyncClient(url, timeout=request_timeout_s, limits=limits) as client:
        if steps is None:
            steps = min((await client.models())["student_steps"])
        end = time.monotonic() + duration_s
        rngs = [random.Random(seed * 1000 + i) for i in range(clients)]
        tasks = [asyncio.ensure_future(_client(client, steps, end, cancel_fraction, r, tally))
                 for r in rngs]
        done, pending = await asyncio.wait(tasks, timeout=duration_s + request_timeout_s + 5)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            t.result()  # a bug in the client loop itself is not a server finding: raise it
    return steps


def _rss_at(samples: list[tuple[float, int]], t: float) -> int | None:
    return next((rss for s, rss in samples if s >= t), samples[-1][1] if samples else None)


def summarize(tally: Tally, samples: list[tuple[float, int]], duration_s: float, steps: int,
              clients: int, seconds: float) -> dict:
    """The report (what --json writes) with the three checks."""
    baseline_s = min(BASELINE_S, duration_s / 2)
    rss_base, rss_end = _rss_at(samples, baseline_s), (samples[-1][1] if samples else None)
    growth = round(100 * (rss_end - rss_base) / rss_base, 2) if rss_base and rss_end else None
    lost = tally.connection_errors + tally.timeouts + tally.unanswered()
    checks = {"no_500": tally.statuses.get(500, 0) == 0, "none_lost": lost == 0,
              "rss_growth_ok": None if growth is None else growth <= MAX_GROWTH_PCT}
    lat = bench_load.percentiles(tally.latencies)
    return {
        "duration_s": duration_s, "seconds": round(seconds, 1), "clients": clients,
        "steps": steps, "requests_sent": tally.sent, "ok_200": tally.ok,
        "other_statuses": {str(k): v for k, v in sorted(tally.statuses.items())},
        "client_cancelled": tally.cancelled, "connection_errors": tally.connection_errors,
        "timeouts": tally.timeouts, "unanswered_at_deadline": tally.unanswered(), "lost": lost,
        "p50_ms": lat["p50_ms"], "p99_ms": lat["p99_ms"],
        "rss_baseline_s": baseline_s,
        "rss_60s_mb": None if rss_base is None else round(rss_base / 2**20, 1),
        "rss_end_mb": None if rss_end is None else round(rss_end / 2**20, 1),
        "rss_growth_pct": growth, "rss_max_growth_pct": MAX_GROWTH_PCT,
        "rss_samples": [[t, round(b / 2**20, 1)] for t, b in samples],
        "checks": checks, "passed": all(v for v in checks.values() if v is not None),
    }


def run_soak(bundle: str | None = None, backend: str = "torch", url: str | None = None,
             pid: int | None = None, duration_s: float = 300.0, clients: int = 16,
             steps: int | None = None, cancel_fraction: float = 0.1,
             request_timeout_s: float = 60.0, seed: int = 0, progress=print,
             state: dict | None = None) -> dict:
    """Start a server (or use the loopback `url`, with its `pid` for RSS) and soak it;
    state["proc"] is set to the started server's process (for a watchdog)."""
    if not 0 < duration_s <= MAX_DURATION_S or not 1 <= clients <= MAX_CLIENTS:
        raise ValueError(f"need 0 < duration-s <= {MAX_DURATION_S:.0f} and "
                         f"1 <= clients <= {MAX_CLIENTS}")
    if not 0 <= cancel_fraction < 1:
        raise ValueError(f"--cancel-fraction must be in [0, 1), got {cancel_fraction}")
    server = None
    if url is not None:
        url = bench_load.check_url(url)  # loopback only, no override
    else:
        if bundle is None:
            from halfstep.server.embedded import default_bundle_path
            bundle = str(default_bundle_path())
        progress(f"soak: starting a server on {bundle} ({backend})")
        server = bench_load.LocalServer(bundle, backend)
        url, pid = server.url, server.proc.pid
        if state is not None:
            state["proc"] = server.proc
    sampler = RssSampler(pid) if pid else None
    tally, started = Tally(), time.monotonic()
    try:
        if sampler:
            sampler.start()
        progress(f"soak: {clients} clients for {duration_s:g} s against {url}")
        steps = asyncio.run(_load(url, steps, clients, duration_s, cancel_fraction,
                                  request_timeout_s, seed, tally))
        samples = sampler.stop() if sampler else []
        report = summarize(tally, samples, duration_s, steps, clients,
                           time.monotonic() - started)
        report["bundle"], report["backend"] = bundle, backend if server else None
        if server:
            report["server_alive_at_end"] = server.proc.poll() is None
            if not report["passed"] or not report["server_alive_at_end"]:
                report["server_log_tail"] = server.tail(4000)
    finally:
        if sampler:
            sampler.stop()
        if server:
            server.close()
    return report


def format_table(r: dict) -> str:
    def mb(v):
        return "-" if v is None else f"{v} MiB"

    rows = [("requests sent", r["requests_sent"]), ("200", r["ok_200"])]
    rows += [(f"status {k}", v) for k, v in r["other_statuses"].items()]
    rows += [("client cancellations", r["client_cancelled"]),
             ("connection errors/resets", r["connection_errors"]),
             ("client timeouts", r["timeouts"]),
             ("unanswered at deadline", r["unanswered_at_deadline"]),
             ("p50 latency (200s)", f"{r['p50_ms']} ms"),
             ("p99 latency (200s)", f"{r['p99_ms']} ms"),
             (f"RSS at {r['rss_baseline_s']:g} s", mb(r["rss_60s_mb"])),
             ("RSS at end", mb(r["rss_end_mb"])),
             (f"RSS growth after {r['rss_baseline_s']:g} s", "-" if r["rss_growth_pct"] is None
              else f"{r['rss_growth_pct']}%")]
    lines = [f"soak: {r['clients']} clients, steps={r['steps']}, n=1, {r['duration_s']:g} s "
             f"({r['seconds']} s wall)", "| measure | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in rows]
    c = r["checks"]
    verdict = {True: "PASS", False: "FAIL", None: "SKIP (no RSS samples)"}
    lines += [f"{verdict[c['no_500']]}: no 500",
              f"{verdict[c['none_lost']]}: no request lost ({r['lost']} lost)",
              f"{verdict[c['rss_growth_ok']]}: RSS growth <= {r['rss_max_growth_pct']:g}% "
              f"after {r['rss_baseline_s']:g} s"]
    return "\n".join(lines)


def _watchdog(seconds: float, state: dict) -> threading.Timer:
    """Hard stop: past `seconds`, stop the server this process started and exit with 3."""
    def fire() -> None:
        print(f"soak: hard deadline of {seconds:.0f} s passed; stopping", file=sys.stderr)
        proc = state.get("proc")
        if proc is not None and proc.poll() is None:
            proc.kill()
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    return timer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m halfstep.bench.soak", description=__doc__)
    p.add_argument("--bundle", help="bundle to serve (default: the embedded one)")
    p.add_argument("--backend", default="torch", help="server backend (default torch)")
    p.add_argument("--url", help="soak a running loopback server instead (no remote hosts)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id, for RSS")
    p.add_argument("--duration-s", type=float, default=300.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--steps", type=int, help="default: the bundle's smallest student")
    p.add_argument("--cancel-fraction", type=float, default=0.1)
    p.add_argument("--request-timeout-s", type=float, default=60.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)
    state: dict = {}
    timer = _watchdog(200 + min(args.duration_s, MAX_DURATION_S) + args.request_timeout_s + 60,
                      state)
    try:
        report = run_soak(args.bundle, args.backend, args.url, args.pid, args.duration_s,
                          args.clients, args.steps, args.cancel_fraction,
                          args.request_timeout_s, args.seed,
                          progress=lambda m: print(m, file=sys.stderr, flush=True), state=state)
    except (ValueError, RuntimeError, TimeoutError) as exc:  # bad input, or no server started
        print(f"soak: {exc}", file=sys.stderr)
        return 2
    finally:
        timer.cancel()
    print(format_table(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the server is stopped too
    sys.exit(main())
