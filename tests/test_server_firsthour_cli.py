"""First-hour behaviour of `halfstep serve`: loopback by default, the address really bound, a
taken port failing at once, a warning when exposed without a key, and a quiet, logged stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from halfstep.server.cli import bind_socket, bound_url, exposure_warning
from halfstep.server.client import Client
from halfstep.server.settings import Settings

from .test_server_support import free_socket

ROOT = Path(__file__).resolve().parents[1]


def halfstep(*args: str, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("HALFSTEP_HOST", None)
    env.pop("HALFSTEP_API_KEY", None)
    return subprocess.Popen([sys.executable, "-m", "halfstep", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def test_default_host_is_loopback():
    assert Settings.from_env({}).host == "127.0.0.1"


def test_exposure_warning_only_off_loopback_without_a_key():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("::1", None) is None
    assert exposure_warning("0.0.0.0", "secret") is None
    warning = exposure_warning("0.0.0.0", None)
    assert warning.startswith("halfstep: warning:") and "HALFSTEP_API_KEY" in warning
    assert "\n" not in warning
    assert exposure_warning("::", None) is not None


def test_bound_url_reports_the_port_really_bound():
    sock = bind_socket("127.0.0.1", 0)
    try:
        port = sock.getsockname()[1]
        assert port != 0
        assert bound_url(sock) == (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}")
    finally:
        sock.close()


def test_a_taken_port_fails_at_once_with_status_2(tiny_bundle_dir):
    taken = free_socket()
    taken.listen()
    port = taken.getsockname()[1]
    try:
        started = time.monotonic()
        proc = halfstep("serve", "--bundle", str(tiny_bundle_dir), "--backend", "torch",
                        "--port", str(port))
        out, _ = proc.communicate(timeout=60)
        elapsed = time.monotonic() - started
    finally:
        taken.close()
    assert proc.returncode == 2, out
    assert out.strip() == (f"halfstep: error: port {port} is in use (another process listens "
                           f"on 127.0.0.1:{port}; stop it or pick another port with --port or "
                           "HALFSTEP_PORT)")
    assert elapsed < 5  # no bundle load, no warm-up: well under a second on an idle machine


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_stop_is_logged_and_quiet(tiny_bundle_dir, sig):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    proc = halfstep("serve", "--bundle", str(tiny_bundle_dir), "--backend", "torch",
                    "--port", str(port), "--max-batch", "4")
    try:
        with Client(f"http://127.0.0.1:{port}") as c:
            c.wait_ready(120)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "Traceback" not in out and "interrupted" not in out
    assert f"at http://127.0.0.1:{port} (bound to 127.0.0.1:{port};" in out
    assert "warning" not in out  # loopback: no exposure warning
    assert "draining 0 requests" in out and "stopped" in out
