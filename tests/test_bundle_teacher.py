"""`halfstep bundle`: a training run's teacher alone as a bundle, the same file distill writes."""

from __future__ import annotations

import pytest
import torch

from halfstep.cli import main
from halfstep.distill.bundle import Bundle
from halfstep.distill.progressive import DistillConfig, distill_run
from halfstep.distill.train import load_run
from tests.conftest import train_tiny_teacher


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return train_tiny_teacher(tmp_path_factory.mktemp("teacher") / "run")


def test_the_teacher_alone_is_a_servable_bundle_with_distills_teacher_file(run_dir, tmp_path,
                                                                           capsys):
    assert main(["bundle", "--teacher", str(run_dir), "--out", str(tmp_path / "t"),
                 "--default-steps", "64", "--max-steps", "256"]) == 0
    assert "teacher only" in capsys.readouterr().out
    only = Bundle(tmp_path / "t")
    assert only.name == "t" and only.student_steps == []
    assert (only.teacher_default_steps, only.teacher_max_steps) == (64, 256)
    assert only.manifest["configs"]["train"]["max_steps"] == 2

    distill_run(DistillConfig(teacher=str(run_dir), out=str(tmp_path / "d"), from_steps=2,
                              iters_per_round=1, batch_size=4, probe_size=2), progress=False)
    distilled = Bundle(tmp_path / "d")
    assert only.manifest["teacher"]["sha256"] == distilled.manifest["teacher"]["sha256"]

    _, teacher = load_run(run_dir)
    z, t, y = torch.randn(2, 1, 28, 28), torch.full((2,), 0.5), torch.tensor([3, 7])
    with torch.no_grad():
        assert torch.equal(only.denoiser("teacher")(z, t, y), teacher(z, t, y))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--default-steps", "0"], "--default-steps must be in 1..--max-steps (1024), got 0"),
        (["--default-steps", "300", "--max-steps", "256"], "must be in 1..--max-steps (256)"),
    ],
)
def test_bad_step_counts_are_refused_before_anything_is_written(run_dir, tmp_path, capsys,
                                                                 extra, message):
    assert main(["bundle", "--teacher", str(run_dir), "--out", str(tmp_path / "t"), *extra]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_an_existing_bundle_is_never_overwritten(run_dir, tmp_path, capsys):
    out = tmp_path / "t"
    assert main(["bundle", "--teacher", str(run_dir), "--out", str(out), "--name", "a"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["bundle", "--teacher", str(run_dir), "--out", str(out), "--name", "b"]) == 2
    assert "already holds a bundle" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_folder_that_is_not_a_training_run_is_one_line(tmp_path, capsys):
    assert main(["bundle", "--teacher", str(tmp_path), "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert "is it a training run" in err or "a training run?" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t").exists()
