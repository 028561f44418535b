"""SIGTERM while `halfstep serve` is still warming up: a prompt, clean exit (status 0), with
no traceback and no abort from the C++ runtime, though the engine thread is still in torch."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from .test_server_support import free_socket

ROOT = Path(__file__).resolve().parents[1]
EXIT_WITHIN_S = 10.0


def test_sigterm_during_warm_up_exits_0_promptly_without_traceback(tmp_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HALFSTEP_CACHE": str(tmp_path)}
    env.pop("HALFSTEP_API_KEY", None)
    # The embedded bundle on eager torch with batch buckets up to 512: warm-up runs every
    # student at every bucket, many seconds of torch work, still going when SIGTERM arrives.
    proc = subprocess.Popen(
        [sys.executable, "-m", "halfstep", "serve", "--backend", "torch", "--max-batch", "512",
         "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # /healthz answers from the start of warm-up
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "server did not start"
            try:
                if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        assert httpx.get(f"{url}/readyz", timeout=2).status_code == 503  # still warming up
        time.sleep(0.5)  # well inside the warm-up's torch calls
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=EXIT_WITHIN_S)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, (proc.returncode, err[-2000:])
    assert "terminate called" not in err and "Traceback" not in err, err[-2000:]
    assert "CancelledError" not in err, err[-2000:]
    assert "warm-up cut short" in err
    assert took < EXIT_WITHIN_S
