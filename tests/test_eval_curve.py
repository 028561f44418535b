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


def test_curve_json_continues_from_its_finished_rows(run_dir, mnist_dir, tmp_path, capsys):
    """--json is written after every row, and a rerun scores only what it lacks: an
    interrupted curve continues. A row is reused only for the same snapshot bytes and
    settings: a retrained snapshot under the same name is scored again."""
    from halfstep.cli import main

    out = tmp_path / "curve" / "snapshots.json"
    argv = ["teacher-curve", "--run", str(run_dir), "--data", f"mnist:{mnist_dir}",
            "--samples", "10", "--ddim-steps", "1", "--cache-dir", str(tmp_path / "cache"),
            "--classifier-steps", "5", "--json", str(out)]
    assert main(argv) == 0
    first = json.loads(out.read_text())
    assert [r["step"] for r in first] == [1000, 2000]
    first[0]["fd_classifier"] = 123.0  # marks the row: a reused row keeps this value
    out.write_text(json.dumps(first[:1]))  # as if cut after the first snapshot
    save_file(tiny_denoiser(7).unet.state_dict(), run_dir / "ema-002000.safetensors")
    capsys.readouterr()
    assert main(argv) == 0
    again = json.loads(out.read_text())
    assert again[0]["fd_classifier"] == 123.0 and "(earlier run)" in capsys.readouterr().out
    assert again[1]["weights_sha256"] != first[1]["weights_sha256"]
    assert again[1]["fd_classifier"] != first[1]["fd_classifier"]  # scored again
    assert main([*argv[:-4], "--samples", "20", *argv[-4:]]) == 0  # other settings: rescored
    assert json.loads(out.read_text())[0]["fd_classifier"] != 123.0

    out.write_text("not json")
    assert main(argv) == 2
    assert "is not a curve's JSON" in capsys.readouterr().err


def test_curve_json_is_saved_after_each_row(run_dir, mnist_dir, tmp_path, monkeypatch):
    """Cut while scoring the second snapshot, the JSON holds the first one's row and keeps
    the earlier rows it had not measured again yet."""
    from halfstep.cli import main
    from halfstep.eval import curve

    out = tmp_path / "snapshots.json"
    older = {"run": "run", "step": 9000, "ddim_steps": 32, "fd_classifier": 9.0}  # old format
    out.write_text(json.dumps([older]))
    score = curve.score_snapshot
    calls = []

    def cut_on_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return score(*args, **kwargs)

    monkeypatch.setattr(curve, "score_snapshot", cut_on_the_second)
    assert main(["teacher-curve", "--run", str(run_dir), "--data", f"mnist:{mnist_dir}",
                 "--samples", "10", "--ddim-steps", "1", "--cache-dir", str(tmp_path / "cache"),
                 "--classifier-steps", "5", "--json", str(out)]) == 130
    saved = json.loads(out.read_text())
    assert [r["step"] for r in saved] == [1000, 9000] and saved[1] == older
    assert main(["teacher-curve", "--run", str(run_dir), "--data", f"mnist:{mnist_dir}",
                 "--json", str(tmp_path)]) == 2


def test_ddim_steps_option_parses_lists():
    parser = build_parser()
    args = parser.parse_args(["teacher-curve", "--run", "r", "--data", "mnist:d",
                              "--ddim-steps", "32,64,128", "--last"])
    assert args.ddim_steps == [32, 64, 128] and args.last
    with pytest.raises(SystemExit):
        parser.parse_args(["teacher-curve", "--run", "r", "--data", "mnist:d",
                           "--ddim-steps", "0"])


def test_curve_scores_with_the_classifier_it_is_given(run_dir, mnist_dir, tmp_path):
    """--classifier FILE: trained there when missing, then used as is (the results table's
    weights on any machine); other weights give other scores under another classifier id."""
    from safetensors.torch import load_file

    kw = dict(samples=10, steps=1, last=True, log=lambda line: None,
              classifier_config=ClassifierConfig(steps=5))
    weights = tmp_path / "table-classifier.safetensors"
    first = teacher_curve([run_dir], mnist_dir, tmp_path / "cache", classifier_path=weights, **kw)
    assert weights.is_file() and not (tmp_path / "cache" / "classifier").exists()
    again = teacher_curve([run_dir], mnist_dir, tmp_path / "cache", classifier_path=weights, **kw)
    assert again[0]["fd_classifier"] == pytest.approx(first[0]["fd_classifier"])
    save_file({k: v * 1.5 for k, v in load_file(weights).items()}, weights)
    other = teacher_curve([run_dir], mnist_dir, tmp_path / "cache", classifier_path=weights, **kw)
    assert other[0]["classifier"] != first[0]["classifier"]
    assert other[0]["fd_classifier"] != pytest.approx(first[0]["fd_classifier"])
