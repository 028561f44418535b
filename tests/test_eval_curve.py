"""`halfstep teacher-curve`: every snapshot (or the newest) at one or several DDIM step counts."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import save_file

from halfstep.cli import build_parser
from halfstep.eval.classifier import ClassifierConfig
from halfstep.eval.curve import teacher_curve

from .conftest import tiny_denoiser


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    den = tiny_denoiser(0)
    (run / "config.json").write_text(json.dumps({"model": den.config.to_dict()}))
    for step, seed in ((1000, 0), (2000, 1)):
        save_file(tiny_denoiser(seed).unet.state_dict(), run / f"ema-{step:06d}.safetensors")
    return run


def test_curve_rows_per_snapshot_and_ddim_steps(run_dir, mnist_dir, tmp_path):
    kw = dict(samples=10, seed=0, log=lambda line: None,
              classifier_config=ClassifierConfig(steps=5))
    every = teacher_curve([run_dir], mnist_dir, tmp_path / "cache", steps=[1, 2], **kw)
    newest = teacher_curve([run_dir], mnist_dir, tmp_path / "cache", steps=2, last=True, **kw)
    assert [(r["step"], r["ddim_steps"]) for r in every] == [(1000, 1), (1000, 2), (2000, 1),
                                                              (2000, 2)]
    assert [(r["step"], r["ddim_steps"]) for r in newest] == [(2000, 2)]
    assert newest[0]["fd_classifier"] == pytest.approx(every[3]["fd_classifier"])  # seeded
    assert every[0]["fd_classifier"] != every[2]["fd_classifier"]  # other weights, other FD
    assert all(0.0 <= r["label_accuracy"] <= 1.0 for r in every)


def test_ddim_steps_option_parses_lists():
    parser = build_parser()
    args = parser.parse_args(["teacher-curve", "--run", "r", "--data", "mnist:d",
                              "--ddim-steps", "32,64,128", "--last"])
    assert args.ddim_steps == [32, 64, 128] and args.last
    with pytest.raises(SystemExit):
        parser.parse_args(["teacher-curve", "--run", "r", "--data", "mnist:d",
                           "--ddim-steps", "0"])
