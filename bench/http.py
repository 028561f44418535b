"""HTTP side of `halfstep bench`: a loopback-only, bounded async load generator.

Every loop here is bounded twice, by a request count and by a wall-clock budget, so a slow or
stuck server cannot keep the benchmark running. Requests go only to the one base URL given,
and that URL must be loopback unless the caller passes allow_remote.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx

from halfstep.server.client import AsyncClient, wait_ready

LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost"}


def check_url(url: str, allow_remote: bool = False) -> str:
    """The base URL without a trailing slash; ValueError for a bad or non-loopback one."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must look like http://HOST:PORT, got {url!r}")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError(f"--url must be the server's base address (no path or query): {url!r}")
    host = parts.hostname
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host.lower() in LOOPBACK_NAMES
    if not loopback and not allow_remote:
        raise ValueError(f"refusing to send load to non-loopback host {host!r}; pass "
                         "--allow-remote if you own that server")
    return url.rstrip("/")


def percentiles(times_s: list[float]) -> dict:
    """p50/p95/p99 and mean in milliseconds (nearest-rank on the sorted sample)."""
    if not times_s:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    s = sorted(times_s)

    def rank(q: float) -> float:
        return round(1e3 * s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))], 3)

    return {"p50_ms": rank(0.50), "p95_ms": rank(0.95), "p99_ms": rank(0.99),
            "mean_ms": round(1e3 * sum(s) / len(s), 3), "n": len(s)}


def cpu_share(cpu_s: float, wall_s: float) -> float | None:
    """CPU seconds of the load generator per wall second (1.0 = one core busy all the time);
    None for an empty interval."""
    return round(cpu_s / wall_s, 3) if wall_s > 0 else None


class CpuClock:
    """The bench process's own CPU time over one HTTP cell: `with CpuClock() as c: ...`, then
    `c.result()`. The server runs in another process (or elsewhere), so on a 2-core machine
    this says how much of the CPU the clients themselves took from the server."""

    def __enter__(self) -> CpuClock:
        self.wall0, self.cpu0 = time.perf_counter(), time.process_time()
        self.wall = self.cpu = 0.0
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self.wall0
        self.cpu = time.process_time() - self.cpu0

    def result(self) -> dict:
        return {"wall_s": round(self.wall, 3), "client_cpu_s": round(self.cpu, 3),
                "client_cpu": cpu_share(self.cpu, self.wall)}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalServer:
    """`halfstep serve` on a free loopback port as a subprocess; always stopped by close()."""

    def __init__(self, bundle: str, backend: str = "auto", max_batch: int = 64,
                 ready_timeout_s: float = 180.0, extra_args: tuple[str, ...] = ()) -> None:
        if not Path(bundle).is_dir():
            raise ValueError(f"--bundle {bundle!r} is not a directory")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", prefix="halfstep-bench-", suffix=".log")
        cmd = [sys.executable, "-m", "halfstep", "serve", "--bundle", str(bundle), "--host",
               "127.0.0.1", "--port", str(self.port), "--backend", backend,
               "--max-batch", str(max_batch), *extra_args]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env=dict(os.environ))
        try:
            wait_ready(self.url, ready_timeout_s, is_alive=lambda: self.proc.poll() is None)
        except (RuntimeError, TimeoutError) as exc:  # with the end of the server's own log
            message = f"{exc}: {self.tail()}"
            self.close()
            raise type(exc)(message) from None
        except BaseException:
            self.close()
            raise

    def tail(self, chars: int = 2000) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-chars:]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the server drains (nothing is queued by now)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log.close()

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def histogram_sum_count(metrics_text: str, name: str) -> tuple[float, float]:
    """(sum, count) of an unlabelled Prometheus histogram in exposition text."""
    total = count = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(f"{name}_sum "):
            total = float(line.split()[1])
        elif line.startswith(f"{name}_count "):
            count = float(line.split()[1])
    return total, count


def _server_split(before: str, after: str) -> dict:
    """Where a request's time went, from the server's own histograms over one cell: mean
    engine time per batch and mean queue wait (the rest is HTTP, encoding and the client)."""
    out = {}
    for key, name in (("server_engine_ms", "halfstep_batch_duration_seconds"),
                      ("server_queue_ms", "halfstep_queue_wait_seconds")):
        (s0, n0), (s1, n1) = histogram_sum_count(before, name), histogram_sum_count(after, name)
        out[key] = round(1e3 * (s1 - s0) / (n1 - n0), 3) if n1 > n0 else None
    return out


async def _latency_cell(client: AsyncClient, model: str, steps: int, requests: int,
                        budget_s: float) -> tuple[list[float], int]:
    """Sequential n=1 requests (concurrency 1): seconds each, and the errors seen."""
    times, errors = [], 0
    deadline = time.monotonic() + budget_s
    for i in range(requests):
        if times and time.monotonic() > deadline:
            break  # bounded in time as well as count (at least one sample is kept)
        started = time.perf_counter()
        try:
            await client.generate(steps=steps, model=model, n=1, seed=i)
            times.append(time.perf_counter() - started)
        except Exception:  # counted and reported, never retried
            errors += 1
    return times, errors


async def _throughput_cell(client: AsyncClient, steps: int, concurrency: int, requests: int,
                           budget_s: float) -> dict:
    """`concurrency` workers share `requests` n=1 student requests; images/s and batch size."""
    batch_sum0, batch_n0 = histogram_sum_count(await client.metrics(), "halfstep_batch_size")
    left, errors, done = [requests], [0], [0]
    deadline = time.monotonic() + budget_s

    async def worker() -> None:
        while left[0] > 0 and time.monotonic() < deadline:
            left[0] -= 1
            try:
                await client.generate(steps=steps, model="student", n=1, seed=left[0])
                done[0] += 1
            except Exception:
                errors[0] += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    batch_sum1, batch_n1 = histogram_sum_count(await client.metrics(), "halfstep_batch_size")
    batches = batch_n1 - batch_n0
    return {"concurrency": concurrency, "steps": steps, "requests": done[0], "errors": errors[0],
            "seconds": round(elapsed, 3), "images_per_s": round(done[0] / elapsed, 2),
            "mean_batch": round((batch_sum1 - batch_sum0) / batches, 2) if batches else None}


async def run_http(url: str, student_steps: list[int], teacher_steps: list[int],
                   concurrencies: list[int], requests: int, throughput_steps: int,
                   budget_s: float, progress=print, api_key: str | None = None) -> dict:
    """Latency cells (student and teacher, n=1) then throughput cells, against one server."""
    limits = httpx.Limits(max_connections=max(concurrencies + [1]))
    async with AsyncClient(url, api_key=api_key, timeout=max(60.0, budget_s),
                           limits=limits) as client:
        info = await client.models()
        latency = []
        cells = [("student", s) for s in student_steps] + [("teacher", s) for s in teacher_steps]
        for model, steps in cells:
            progress(f"bench: HTTP latency {model} {steps} steps ({requests} requests)")
            await client.generate(steps=steps, model=model, n=1, seed=0)  # untimed warm request
            before = await client.metrics()
            with CpuClock() as clock:
                times, errors = await _latency_cell(client, model, steps, requests, budget_s)
            latency.append({"model": model, "steps": steps, "errors": errors,
                            **percentiles(times), **_server_split(before, await client.metrics()),
                            "client_cpu": clock.result()["client_cpu"]})
        throughput = []
        for c in concurrencies:
            progress(f"bench: throughput at concurrency {c} (student {throughput_steps} steps)")
            with CpuClock() as clock:
                cell = await _throughput_cell(client, throughput_steps, c, max(requests, 4 * c),
                                              budget_s)
            throughput.append({**cell, "client_cpu": clock.result()["client_cpu"]})
    return {"server": info, "latency": latency, "throughput": throughput}
