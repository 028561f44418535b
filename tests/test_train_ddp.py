"""Two gloo processes under torchrun end with the same weights as one process on the same data."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file


def _train(tmp_path, name, nproc):
    out = tmp_path / name
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--master_port",
        str(29500 + nproc + os.getpid() % 1000),
        "-m",
        "halfstep",
        "train",
        "--data",
        "synthetic:64",
        "--out",
        str(out),
        "--preset",
        "tiny",
        "--max-steps",
        "3",
        "--checkpoint-every",
        "3",
        "--batch-size",
        "8",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"], load_file(
        out / "ema.safetensors"
    )


@pytest.mark.slow
def test_two_process_ddp_matches_single_process(tmp_path):
    single, single_ema = _train(tmp_path, "one", 1)
    double, double_ema = _train(tmp_path, "two", 2)
    assert single.keys() == double.keys()
    moved = 0
    for key in single:
        torch.testing.assert_close(double[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    for key in single_ema:
        torch.testing.assert_close(double_ema[key], single_ema[key], rtol=1e-4, atol=1e-5)
        moved += 1
    assert moved > 0
