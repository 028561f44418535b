"""SIGTERM: stop accepting, finish queued and running work (bounded), exit 0; nothing lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from halfstep.server.client import Client

from .test_server_support import free_socket

ROOT = Path(__file__).resolve().parents[1]

SERVER = textwrap.dedent("""
    import sys, time
    from halfstep.distill.bundle import Bundle
    from halfstep.server.cli import serve
    from halfstep.server.settings import Settings
    from tests.test_server_support import InstrumentedEngine

    class SlowEngine(InstrumentedEngine):  # each batch takes >= 0.6 s: work is in flight
        def run(self, *args):
            time.sleep(0.6)
            return super().run(*args)

    bundle_dir, port = sys.argv[1], int(sys.argv[2])
    settings = Settings(bundle=bundle_dir, host="127.0.0.1", port=port, backend="torch",
                        max_batch=4, max_wait_ms=5, drain_s=60)
    sys.exit(serve(settings, engine=SlowEngine(Bundle(bundle_dir))))
""")


def test_sigterm_finishes_accepted_work_then_exits(tiny_bundle_dir):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(tiny_bundle_dir), str(port)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    try:
        with Client(url) as c:
            c.wait_ready(120)
        keys = [1, 2, 4, 8, 1, 2]  # four keys: several batches queue behind each other
        with ThreadPoolExecutor(len(keys)) as pool:
            futures = [pool.submit(_generate, url, s, i) for i, s in enumerate(keys)]
            time.sleep(0.8)  # all accepted and queued or running
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                refused = httpx.get(f"{url}/healthz", timeout=2).status_code != 200
            except httpx.TransportError:
                refused = True
            results = [f.result(timeout=120) for f in futures]
        code = proc.wait(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert results == [(200, str(s)) for s in keys], out
    assert refused, "still accepting new connections after SIGTERM"
    # uvicorn re-raises the signal it caught once shutdown is complete (exit by SIGTERM)
    assert code in (0, -signal.SIGTERM), out
    assert "Application shutdown complete" in out
    assert f"at http://127.0.0.1:{port}" in out and "backend torch" in out


def _generate(url: str, steps: int, seed: int) -> tuple[int, str]:
    r = httpx.post(f"{url}/generate", params={"steps": steps, "seed": seed}, timeout=120)
    return r.status_code, r.headers.get("x-halfstep-steps", r.text)
