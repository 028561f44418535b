"""The README's pipeline end to end on real MNIST: train -> distill -> sample (--preset tiny)."""

import json
import subprocess
import sys

import pytest

from halfstep.cli import build_parser, main


def halfstep(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "halfstep", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"halfstep {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def test_help_lists_subcommands():
    helptext = build_parser().format_help()
    for cmd in ("train", "distill", "sample"):
        assert cmd in helptext


@pytest.mark.slow
def test_tiny_pipeline_on_mnist(mnist_dir, tmp_path):
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    halfstep(
        "train",
        "--data",
        f"mnist:{mnist_dir}",
        "--out",
        run,
        "--preset",
        "tiny",
        "--max-steps",
        12,
        "--checkpoint-every",
        6,
        "--batch-size",
        16,
    )
    assert (run / "ema.safetensors").is_file() and (run / "samples-000012.png").is_file()
    config = json.loads((run / "config.json").read_text())
    assert config["max_steps"] == 12 and config["model"]["parameterization"] == "v"
    # Resume continues from the checkpoint instead of starting over.
    out = halfstep(
        "train",
        "--data",
        f"mnist:{mnist_dir}",
        "--out",
        run,
        "--preset",
        "tiny",
        "--max-steps",
        14,
        "--batch-size",
        16,
        "--resume",
    )
    assert "from step 12" in out.stdout
    out = halfstep(
        "distill",
        "--teacher",
        run,
        "--out",
        bundle,
        "--from-steps",
        4,
        "--iters-per-round",
        3,
        "--round-iters",
        "1=5",
        "--batch-size",
        8,
        "--probe-seeds",
        4,
    )
    assert "round 4->2" in out.stdout and "round 2->1" in out.stdout
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["configs"]["distill"]["probe_size"] == 4
    assert [s["steps"] for s in manifest["students"]] == [1, 2]
    assert {s["steps"]: s["iters"] for s in manifest["students"]} == {1: 5, 2: 3}
    assert manifest["teacher"]["default_steps"] == 4
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    halfstep(
        "sample", "--bundle", bundle, "--steps", 2, "--n", 4, "--seed", 7, "--label", 3, "--out", a
    )
    halfstep(
        "sample", "--bundle", bundle, "--steps", 2, "--n", 4, "--seed", 7, "--label", 3, "--out", b
    )
    assert a.read_bytes() == b.read_bytes() and a.read_bytes()[:4] == b"\x89PNG"
    halfstep(
        "sample",
        "--bundle",
        bundle,
        "--steps",
        3,
        "--model",
        "teacher",
        "--sampler",
        "ancestral",
        "--out",
        tmp_path / "c.png",
    )
    # An existing bundle is not overwritten; --resume with every round done is a no-op.
    again = halfstep("distill", "--teacher", run, "--out", bundle, "--from-steps", 4, check=False)
    assert again.returncode == 2 and "--resume" in again.stderr
    halfstep("distill", "--teacher", run, "--out", bundle, "--from-steps", 4, "--resume")


def test_user_errors_are_one_line(tiny_bundle_dir, tmp_path, capsys):
    cases = [
        (
            [
                "sample",
                "--bundle",
                tiny_bundle_dir,
                "--steps",
                3,
                "--exact",
                "--out",
                tmp_path / "x.png",
            ],
            "no student has steps=3; students: 1, 2, 4, 8",
        ),
        (
            ["sample", "--bundle", tiny_bundle_dir, "--steps", 0, "--out", tmp_path / "x.png"],
            "below the smallest student",
        ),
        (
            ["sample", "--bundle", tmp_path, "--steps", 1, "--out", tmp_path / "x.png"],
            "not a halfstep bundle",
        ),
        (
            [
                "sample",
                "--bundle",
                tiny_bundle_dir,
                "--steps",
                1,
                "--label",
                10,
                "--out",
                tmp_path / "x.png",
            ],
            "label must be in 0..9",
        ),
        (["train", "--data", f"mnist:{tmp_path}", "--out", tmp_path / "r"], "missing MNIST file"),
        (["distill", "--teacher", tmp_path, "--out", tmp_path / "b"], "training run"),
        (
            ["distill", "--teacher", tmp_path, "--out", tmp_path / "b", "--from-steps", 6],
            "power of two",
        ),
        (
            ["distill", "--teacher", tmp_path, "--out", tmp_path / "b", "--probe-seeds", 0],
            "--probe-seeds must be >= 1",
        ),
    ]
    for argv, message in cases:
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_sample_steps_are_a_budget_unless_exact(tiny_bundle_dir, tmp_path, capsys):
    """The HTTP API's rule: the largest student <= --steps; --exact demands that student."""
    from halfstep.distill.bundle import Bundle
    from halfstep.distill.sample import sample_images

    def run(*extra):
        out = tmp_path / "grid.png"
        argv = ["sample", "--bundle", tiny_bundle_dir, "--n", 2, "--seed", 5, "--out", out, *extra]
        assert main([str(a) for a in argv]) == 0
        return capsys.readouterr().out, out.read_bytes()

    text, budget3 = run("--steps", 3)
    assert "student: 2 steps (the largest student <= 3)" in text
    assert budget3 == run("--steps", 2, "--exact")[1]  # the same student, the same images
    assert "student: 8 steps (the largest student <= 100)" in run("--steps", 100)[0]
    assert "student: 8 steps (the largest student)" in run()[0]
    text, exact4 = run("--steps", 4, "--exact")
    assert "student: 4 steps (exact)" in text and exact4 != budget3
    assert "teacher: 16 steps (the teacher's default)" in run("--model", "teacher")[0]
    assert "teacher: 3 steps (exact)" in run("--model", "teacher", "--steps", 3)[0]
    # The library call stays exact: it runs what it is given.
    with pytest.raises(ValueError, match="available"):
        sample_images(Bundle(tiny_bundle_dir), 3, n=1)


def _train_argv(run, max_steps, widths="16,48", layers="2", groups=None, resume=False):
    argv = ["train", "--data", "synthetic:64", "--out", str(run), "--preset", "tiny",
            "--batch-size", "8", "--max-steps", str(max_steps), "--checkpoint-every", "2",
            "--widths", widths, "--layers-per-block", layers]
    return argv + (["--norm-groups", groups] if groups else []) + (["--resume"] if resume else [])


def test_train_widths_and_depth_are_recorded_and_resume_keeps_the_model(tmp_path, capsys):
    """--widths / --layers-per-block make the network; --resume refuses another network with
    one line instead of a state-dict traceback (or, for --norm-groups, silently training a
    different model: GroupNorm tensors have the same shape for any grouping)."""
    run = tmp_path / "run"
    assert main(_train_argv(run, 2)) == 0
    model = json.loads((run / "config.json").read_text())["model"]
    assert model["block_out_channels"] == [16, 48] and model["layers_per_block"] == 2
    capsys.readouterr()

    assert main(_train_argv(run, 3, resume=True)) == 0  # the same network continues
    assert "from step 2" in capsys.readouterr().out

    for change, named in (({"widths": "16,32"}, "block_out_channels: [16, 48] there"),
                          ({"layers": "1"}, "layers_per_block: 2 there"),
                          ({"groups": "4"}, "norm_num_groups: 8 there")):
        assert main(_train_argv(run, 4, resume=True, **change)) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
    assert json.loads((run / "config.json").read_text())["model"] == model  # nothing rewritten


def test_train_resume_starts_a_new_run_but_not_in_a_foreign_folder(tmp_path, capsys):
    """One command for a Job's first start and its restarts: --resume where OUT does not exist,
    or holds only what a run writes before its first checkpoint completes (here: the EMA of a
    save cut before its checkpoint, a snapshot, a grid, a temporary file, log lines), starts at
    step 0 and drops what that start logged; a folder that is not a run's is refused as it is."""
    run = tmp_path / "job"
    assert main(_train_argv(run, 2, resume=True)) == 0
    assert "no checkpoint in" in capsys.readouterr().out
    assert (run / "checkpoint.pt").is_file()
    assert main(_train_argv(run, 3, resume=True)) == 0
    assert "from step 2" in capsys.readouterr().out

    (run / "checkpoint.pt").unlink()  # killed before its first checkpoint completed
    (run / "ema-000200.safetensors").write_bytes((run / "ema.safetensors").read_bytes())
    (run / ".checkpoint.pt.x1y2.tmp").write_bytes(b"cut")
    (run / "loss.jsonl").write_text('{"step": 50, "loss": 0.2}\n{"step": 100, "lo')
    assert main(_train_argv(run, 2, resume=True)) == 0
    assert "starting at step 0" in capsys.readouterr().out
    assert (run / "loss.jsonl").read_text() == ""  # the tiny run logs every 50 steps
    assert not (run / "ema-000200.safetensors").exists()

    foreign = tmp_path / "bundle"
    foreign.mkdir()
    (foreign / "bundle.json").write_text("{}")
    not_a_run = tmp_path / "other"
    not_a_run.mkdir()
    (not_a_run / "config.json").write_text('["not", "a", "run"]')
    a_file = tmp_path / "file"
    a_file.write_text("x")
    for out, message in ((foreign, "does not write (bundle.json)"),
                         (not_a_run, "config.json is not a training run's config"),
                         (a_file, "is a file, not a training run's folder")):
        before = sorted(p.name for p in out.iterdir()) if out.is_dir() else a_file.read_text()
        assert main(_train_argv(out, 2, resume=True)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert before == (sorted(p.name for p in out.iterdir()) if out.is_dir() else "x")


def test_resume_drops_what_the_run_wrote_after_its_checkpoint(tmp_path):
    from halfstep.distill.run_folder import discard_after

    log = tmp_path / "loss.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 0.1}) + "\n" for s in (50, 100, 150))
                   + '{"step": 200, "lo')  # cut short by a kill
    for name in ("ema-000100.safetensors", "ema-000150.safetensors", "samples-000150.png"):
        (tmp_path / name).write_bytes(b"")
    discard_after(tmp_path, 100)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [50, 100]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ema-000100.safetensors", "loss.jsonl"]


def test_train_refuses_bad_widths_and_depth(tmp_path, capsys):
    run = tmp_path / "r"
    with pytest.raises(SystemExit) as exit_info:  # argparse: the usage line, then the error
        main(_train_argv(run, 2, widths="16,x"))
    assert exit_info.value.code == 2
    assert "expected comma-separated integers" in capsys.readouterr().err
    for change, message in (({"widths": "12,24"}, "divisible by norm_num_groups=8"),
                            ({"widths": "16,32,32,32"}, "image size 28 must be divisible by 8"),
                            ({"layers": "0"}, "--layers-per-block must be >= 1")):
        assert main(_train_argv(run, 2, **change)) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not run.exists()
