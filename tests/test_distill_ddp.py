"""Distillation under torchrun: two gloo processes make the same students as one, and a run
resumes at another world size, after its last finished round or inside the running one."""

import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from halfstep.distill.bundle import Bundle
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import noise_for_seeds


def _free_port() -> int:
    """A port nothing listens on now (a fixed one collides with a run still in TIME_WAIT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args, nproc):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "halfstep", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp") / "teacher"
    _run(["train", "--data", "synthetic:64", "--out", str(out), "--preset", "tiny",
          "--max-steps", "2", "--checkpoint-every", "2", "--batch-size", "8"], 1)
    return out


def _distill(teacher, out, nproc, to_steps=1, resume=False):
    args = ["distill", "--teacher", str(teacher), "--out", str(out), "--from-steps", "4",
            "--to-steps", str(to_steps), "--iters-per-round", "3", "--batch-size", "8",
            "--round-lr", "2=5e-4,1=1e-3" if to_steps == 1 else "2=5e-4"]
    return _run(args + (["--resume"] if resume else []), nproc)


def _students(out):
    bundle = Bundle(out)
    return {n: load_file(bundle.path(f"student-{n}.safetensors")) for n in bundle.student_steps}


def _assert_same(a_dir, b_dir):
    """Same weights up to float summation order, which Adam amplifies for near-zero gradients
    (each update is ~lr whatever the gradient's size), and the same images."""
    a, b = _students(a_dir), _students(b_dir)
    assert a.keys() == b.keys()
    for n in a:
        for key in a[n]:
            torch.testing.assert_close(b[n][key], a[n][key], rtol=1e-3, atol=3e-4,
                                       msg=f"student-{n} {key}")
    bundle_a, bundle_b = Bundle(a_dir), Bundle(b_dir)
    noise = noise_for_seeds(list(range(8)), bundle_a.image_shape)
    labels = torch.arange(8) % (bundle_a.num_labels + 1)
    for n in a:
        images_a = reference_images(bundle_a, "student", n, noise, labels)
        images_b = reference_images(bundle_b, "student", n, noise, labels)
        assert (images_a - images_b).abs().max() < 2e-3, f"student-{n} images differ"


@pytest.mark.slow
def test_two_processes_distill_the_same_students_as_one(teacher_run, tmp_path):
    _distill(teacher_run, tmp_path / "one", 1)
    proc = _distill(teacher_run, tmp_path / "two", 2)
    assert Bundle(tmp_path / "one").student_steps == [1, 2]
    _assert_same(tmp_path / "one", tmp_path / "two")
    manifest = Bundle(tmp_path / "two").manifest
    metrics = {s["steps"]: s["metrics"] for s in manifest["students"]}
    assert metrics[2]["processes"] == 2 and metrics[2]["lr"] == 5e-4 and metrics[1]["lr"] == 1e-3
    assert proc.stdout.count("round 2->1") == 1  # rank 0 alone reports


@pytest.mark.slow
def test_resume_after_a_round_at_another_world_size(teacher_run, tmp_path):
    _distill(teacher_run, tmp_path / "straight", 1)
    _distill(teacher_run, tmp_path / "split", 2, to_steps=2)  # first round on two processes
    assert Bundle(tmp_path / "split").student_steps == [2]
    _distill(teacher_run, tmp_path / "split", 1, resume=True)  # second round on one
    _assert_same(tmp_path / "straight", tmp_path / "split")


@pytest.mark.slow
def test_a_round_cut_in_one_process_continues_in_two(teacher_run, tmp_path, monkeypatch):
    """The saved state of a running round (student, Adam) loads on every rank: a round cut
    after 2 of its 3 iterations in one process ends on two with the uncut round's student."""
    from halfstep.distill.progressive import DistillConfig, distill_run
    from tests.test_progressive import _interrupt_after

    _distill(teacher_run, tmp_path / "straight", 1, to_steps=2)
    cut = tmp_path / "cut"
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        distill_run(DistillConfig(teacher=str(teacher_run), out=str(cut), from_steps=4,
                                  to_steps=2, iters_per_round=3, batch_size=8,
                                  round_lr={2: 5e-4}, checkpoint_every=1), progress=False)
    proc = _run(["distill", "--teacher", str(teacher_run), "--out", str(cut), "--from-steps",
                 "4", "--to-steps", "2", "--iters-per-round", "3", "--batch-size", "8",
                 "--round-lr", "2=5e-4", "--checkpoint-every", "1", "--resume"], 2)
    assert "round 4->2: continuing at iteration 2" in proc.stdout
    assert Bundle(cut).manifest["students"][0]["metrics"]["processes"] == 2
    _assert_same(tmp_path / "straight", cut)
