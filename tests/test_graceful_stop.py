"""SIGTERM (a Kubernetes eviction, `kill`, torchrun shutting down) stops training and
distillation after the running iteration with their state saved, so --resume loses nothing."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import train_tiny_teacher
from tests.test_distill_ddp import _free_port


def _start(args: list[str], launcher: list[str] | None = None) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = (launcher or [sys.executable]) + ["-m", "halfstep", *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)


def _terminate_once(proc: subprocess.Popen, appears: Path) -> tuple[int, str]:
    """SIGTERM `proc` once `appears` exists (the loop is running); its exit status and stderr."""
    deadline = time.monotonic() + 180
    while not appears.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{appears} never appeared: {proc.communicate()[1][-2000:]}")
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _stopped_at(proc: subprocess.Popen, appears: Path, report: str) -> int:
    """SIGTERM a single-process run once `appears` exists; it must exit 143 without a stack
    trace, saying `report` (a pattern whose group is the step it stopped after): that step."""
    rc, err = _terminate_once(proc, appears)
    assert rc == 128 + signal.SIGTERM, err[-2000:]
    said = re.search(report, err)
    assert said and "Traceback" not in err, err[-2000:]
    return int(said.group(1))


def test_sigterm_stops_training_with_a_checkpoint_of_the_last_step(tmp_path):
    out = tmp_path / "teacher"
    proc = _start(["train", "--data", "synthetic:32", "--out", str(out), "--preset", "tiny",
                   "--max-steps", "100000", "--checkpoint-every", "3", "--batch-size", "4"])
    step = _stopped_at(proc, out / "checkpoint.pt",
                       r"stopped by SIGTERM after step (\d+), saved in .*--resume")
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == step >= 3


def test_sigterm_stops_a_distillation_round_with_its_state_saved(tmp_path):
    teacher = str(train_tiny_teacher(tmp_path / "teacher"))
    out = tmp_path / "bundle"
    proc = _start(["distill", "--teacher", teacher, "--out", str(out), "--from-steps", "4",
                   "--to-steps", "2", "--iters-per-round", "100000", "--checkpoint-every", "2",
                   "--batch-size", "4", "--probe-seeds", "2"])
    done = _stopped_at(proc, out / "round-4to2.partial.pt",
                       r"stopped by SIGTERM after iteration (\d+) of round 4->2, saved in")
    state = torch.load(out / "round-4to2.partial.pt", weights_only=True)
    assert state["next_iter"] == done >= 2
    assert len(state["losses"]) == state["next_iter"]


@pytest.mark.slow
def test_sigterm_to_torchrun_stops_every_rank_at_the_same_step(tmp_path):
    """torchrun passes SIGTERM to its workers; they agree on the step (a rank stopping alone
    would hang the other in its next all-reduce) and rank 0 saves it."""
    out = tmp_path / "teacher"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                "--master_addr", "127.0.0.1", "--master_port", str(_free_port())]
    proc = _start(["train", "--data", "synthetic:32", "--out", str(out), "--preset", "tiny",
                   "--max-steps", "100000", "--checkpoint-every", "3", "--batch-size", "4"],
                  launcher)
    rc, err = _terminate_once(proc, out / "checkpoint.pt")
    reported = [int(s) for s in re.findall(r"stopped by SIGTERM after step (\d+)", err)]
    assert len(reported) == 2 and len(set(reported)) == 1, err[-3000:]  # both, the same step
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == reported[0]
    assert rc != 0
