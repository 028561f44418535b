"""SIGTERM on a real `serve` process: at once not ready, new work 503 Draining with
Retry-After, accepted work finished (bounded by --drain-s), exit status 0; nothing reset."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx

from halfstep.server.client import Client

from .test_server_support import free_socket

ROOT = Path(__file__).resolve().parents[1]

SERVER = textwrap.dedent("""
    import sys, time
    from halfstep.distill.bundle import Bundle
    from halfstep.server.cli import leave, serve
    from halfstep.server.settings import Settings
    from tests.test_server_support import InstrumentedEngine

    class SlowEngine(InstrumentedEngine):  # each batch takes >= run_s: work is in flight
        def run(self, model, steps, noise, labels):
            time.sleep(float(sys.argv[4]))
            if int(labels[0]) == 3:  # label 3: the engine is stuck
                time.sleep(600)
            return super().run(model, steps, noise, labels)

    bundle_dir, port, drain_s = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    settings = Settings(bundle=bundle_dir, host="127.0.0.1", port=port, backend="torch",
                        max_batch=4, max_wait_ms=5, drain_s=drain_s)
    leave(serve(settings, engine=SlowEngine(Bundle(bundle_dir))))  # as `halfstep serve` ends
""")


def start(bundle_dir, drain_s: float, run_s: float) -> tuple[subprocess.Popen, str]:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(bundle_dir), str(port), str(drain_s), str(run_s)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    with Client(url) as c:
        c.wait_ready(120)
    return proc, url


def client_loop(url: str, steps: int, out: list) -> None:
    """Send requests one after another (a new connection each) until one is refused 503 or
    the port is closed; record (status, body) or the transport error's type name."""
    for seed in range(1000):
        try:
            r = httpx.post(f"{url}/generate", params={"steps": steps, "seed": seed}, timeout=120)
        except httpx.ConnectError:
            return  # the port is closed: nothing was accepted, nothing lost
        except httpx.TransportError as exc:
            out.append((type(exc).__name__, ""))
            return
        out.append((r.status_code, r.headers.get("retry-after"), r.text[:200]))
        if r.status_code != 200:
            return


def test_sigterm_under_load_answers_200_or_503_and_exits_0(tiny_bundle_dir):
    proc, url = start(tiny_bundle_dir, drain_s=60, run_s=0.3)
    outs: list[list] = [[] for _ in range(4)]
    threads = [threading.Thread(target=client_loop, args=(url, s, out))
               for s, out in zip((1, 2, 4, 8), outs, strict=True)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.5)  # a few batches done, more queued and running
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        for t in threads:
            t.join(120)
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    log = proc.stdout.read()
    answers = [a for out in outs for a in out]
    assert ready.status_code == 503 and ready.json()["reason"] == "draining", log
    assert all(a[0] in (200, 503) for a in answers), (answers, log)
    refused = [a for a in answers if a[0] == 503]
    assert refused and all(a[1] == "1" and "shutting down" in a[2] for a in refused), answers
    assert sum(a[0] == 200 for a in answers) >= 4
    assert code == 0, log
    assert "Application shutdown complete" in log


def stop_with_a_stuck_request(bundle_dir, drain_s: float, sigterms: int):
    """Serve, POST a request whose engine run never ends (label 3), then send `sigterms`
    SIGTERMs 1 s apart; returns (exit status, seconds from the last signal to the exit, the
    request's answers as (status, body), the server's log)."""
    proc, url = start(bundle_dir, drain_s=drain_s, run_s=0.0)
    answer: list = []

    def stuck() -> None:
        r = httpx.post(f"{url}/generate", params={"steps": 1, "label": 3}, timeout=60)
        answer.append((r.status_code, r.text[:200]))

    thread = threading.Thread(target=stuck, daemon=True)
    try:
        thread.start()
        time.sleep(0.5)  # the engine thread is inside the stuck run
        for i in range(sigterms):
            if i:
                time.sleep(1.0)  # draining, waiting for the stuck run
                assert proc.poll() is None, proc.stdout.read()
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        took = time.monotonic() - t0
        thread.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, took, answer, proc.stdout.read()


def test_drain_0_exits_at_once_even_with_the_engine_stuck(tiny_bundle_dir):
    code, took, answer, log = stop_with_a_stuck_request(tiny_bundle_dir, drain_s=0, sigterms=1)
    assert code == 0, log
    assert took < 10  # neither the drain nor the engine thread waits for the stuck run
    assert [status for status, _ in answer] == [503]


def test_a_second_sigterm_answers_accepted_work_503_and_exits_cleanly(tiny_bundle_dir):
    """The first SIGTERM waits for the stuck run (drain 60 s); the second stops at once: the
    request is answered 503, not cut off with a 500, and the lifespan's shutdown still runs,
    with no CancelledError traceback."""
    code, took, answer, log = stop_with_a_stuck_request(tiny_bundle_dir, drain_s=60, sigterms=2)
    assert code == 0, log
    assert took < 10, log
    assert len(answer) == 1 and answer[0][0] == 503 and "stopped at once" in answer[0][1], answer
    assert "Traceback" not in log and "CancelledError" not in log, log
    assert "Application shutdown complete" in log, log
