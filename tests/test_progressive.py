"""Algorithm 2: the target identity, the last-step rule, and that distillation learns."""

import pytest
import torch

from halfstep.distill.data import synthetic_dataset
from halfstep.distill.losses import WeightedXLoss
from halfstep.distill.progressive import (
    DistillConfig,
    distill_round,
    distillation_target,
    probe_gap,
)
from halfstep.distill.sampling import ddim_step
from tests.conftest import tiny_denoiser, train_tiny_teacher


def _two_teacher_steps(teacher, z_t, t, labels, n):
    """Reference: two unclipped DDIM steps t -> t' -> t'' written out independently."""
    sched = teacher.schedule
    out, ts = z_t, [t, t - 0.5 / n, t - 1.0 / n]
    for a, b in zip(ts[:-1], ts[1:]):
        xh = teacher(out, a, labels)
        (a_a, s_a), (a_b, s_b) = (
            [v.view(-1, 1, 1, 1) for v in sched.alpha_sigma(x)] for x in (a, b)
        )
        out = ddim_step(out, xh, a_a, s_a, a_b, s_b)
    return out, xh


@pytest.mark.parametrize("n_student", [1, 4, 64, 1024])
def test_one_student_step_with_x_tgt_lands_on_two_teacher_steps(n_student):
    teacher = tiny_denoiser().double().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    b = 4
    i = torch.tensor([n_student, max(1, n_student // 2), min(2, n_student), 1])
    t = i.double() / n_student
    z_t = torch.randn(b, 1, 28, 28, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 10, 7])
    x_tgt = distillation_target(teacher, z_t, t, labels, n_student)
    z_2, xh_last = _two_teacher_steps(teacher, z_t, t, labels, n_student)
    sched = teacher.schedule
    (a_t, s_t), (a_2, s_2) = (
        [v.view(-1, 1, 1, 1) for v in sched.alpha_sigma(x)] for x in (t, t - 1.0 / n_student)
    )
    student_step = ddim_step(z_t, x_tgt, a_t, s_t, a_2, s_2)
    last = i == 1
    # Non-final steps: the identity holds to 1e-10 in float64.
    if (~last).any():
        assert (student_step[~last] - z_2[~last]).abs().max() < 1e-10
    # Final step (t'' = 0): samplers return x_hat there, so the student's output x_tgt must be
    # exactly the teacher's final x_hat.
    assert last.any() and (x_tgt[last] - xh_last[last]).abs().max() < 1e-12


def test_distillation_makes_student_match_teacher():
    """Two rounds (4 -> 2 -> 1) on synthetic data close the gap to the teacher's 2-step sample."""
    torch.manual_seed(0)
    data = synthetic_dataset(256)
    teacher = tiny_denoiser()
    cfg = DistillConfig(
        teacher="unused",
        out="unused",
        from_steps=4,
        to_steps=1,
        iters_per_round=40,
        batch_size=16,
        lr=2e-3,
    )
    loss_fn = WeightedXLoss("snr_trunc")
    student2, m2 = distill_round(teacher, data, 2, cfg, loss_fn, progress=False)
    student1, m1 = distill_round(student2, data, 1, cfg, loss_fn, progress=False)
    assert m2["gap_to_teacher_end"] < m2["gap_to_teacher_start"]
    assert m1["gap_to_teacher_end"] < m1["gap_to_teacher_start"]
    gap = probe_gap(student1, student2, 1, cfg.probe_size)
    assert gap == pytest.approx(m1["gap_to_teacher_end"], abs=1e-3)
    # The student is a new network; the teacher was not touched.
    assert not any(p.requires_grad for p in teacher.parameters())


def test_config_validation():
    with pytest.raises(ValueError, match="power of two"):
        DistillConfig(teacher="a", out="b", from_steps=12, to_steps=1)
    with pytest.raises(ValueError, match="power of two"):
        DistillConfig(teacher="a", out="b", from_steps=8, to_steps=0)
    assert DistillConfig(teacher="a", out="b", from_steps=16, to_steps=2).round_steps() == [8, 4, 2]
    cfg = DistillConfig(teacher="a", out="b", from_steps=8, iters_per_round=7, round_iters={2: 9})
    assert [cfg.iters_for(n) for n in cfg.round_steps()] == [7, 9, 7]
    with pytest.raises(ValueError, match=r"steps \[16\].*\[4, 2, 1\]"):
        DistillConfig(teacher="a", out="b", from_steps=8, round_iters={16: 5})
    with pytest.raises(ValueError, match=">= 1 iteration"):
        DistillConfig(teacher="a", out="b", from_steps=8, round_iters={2: 0})
    with pytest.raises(ValueError, match="--probe-seeds must be >= 1"):
        DistillConfig(teacher="a", out="b", from_steps=8, probe_size=0)


def test_progress_prints_plain_lines_off_a_terminal(capsys):
    """Under pytest stderr is captured, not a terminal: whole lines, no carriage returns."""
    from halfstep.distill.progress import LineProgress, progress

    bar = progress(range(4), desc="4->2 steps", every_s=0.0)
    assert isinstance(bar, LineProgress)
    for _ in bar:
        bar.set_postfix(loss="0.1250")
    err = capsys.readouterr().err
    assert "\r" not in err
    lines = err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith("4->2 steps: 4/4 (100%), ")
    assert lines[0].startswith("4->2 steps: 1/4 (25%), ") and "loss=0.1250" in lines[0]


def test_progress_periodic_and_final_line(capsys):
    from halfstep.distill.progress import progress

    bar = progress(total=10, initial=4, desc="train")  # resumed at 4; every 30 s by default
    for _ in range(6):
        bar.update(1)
    bar.close()
    bar.close()  # once only
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 10/10 (100%), ")


def test_progress_disabled_or_on_a_terminal(capsys):
    from tqdm import tqdm

    from halfstep.distill.progress import progress

    silent = progress(range(3), disable=True)
    assert list(silent) == [0, 1, 2]
    silent.set_postfix(loss=1)
    silent.close()
    assert capsys.readouterr().err == ""
    bar = progress(range(3), desc="x", terminal=True)
    assert isinstance(bar, tqdm) and list(bar) == [0, 1, 2]


def test_distill_round_logs_plain_progress(capsys):
    """distill_round's progress off a terminal: one readable line at the end of the round."""
    data = synthetic_dataset(32)
    cfg = DistillConfig(teacher="unused", out="unused", from_steps=2, to_steps=1,
                        iters_per_round=2, batch_size=4, probe_size=2)
    distill_round(tiny_denoiser(), data, 1, cfg, WeightedXLoss("snr_trunc"))
    err = capsys.readouterr().err
    assert "\r" not in err and "2->1 steps: 2/2 (100%)" in err and "loss=" in err


def test_a_resumed_run_records_its_own_settings_beside_the_creating_runs(tmp_path):
    """`--resume` with longer rounds or another rate must not leave the manifest claiming the
    creating run's settings made every student: each student names the config that made it."""
    from halfstep.distill.bundle import Bundle
    from halfstep.distill.progressive import distill_run

    teacher = str(train_tiny_teacher(tmp_path / "teacher"))
    common = dict(teacher=teacher, out=str(tmp_path / "bundle"), from_steps=4,
                  iters_per_round=2, batch_size=4, probe_size=2)
    distill_run(DistillConfig(**common, to_steps=2), progress=False)
    resumed = DistillConfig(**common, to_steps=1, round_iters={1: 3}, lr=5e-5)
    distill_run(resumed, resume=True, progress=False)
    # a resume with nothing left to make records nothing
    distill_run(resumed, resume=True, progress=False)

    manifest = Bundle(tmp_path / "bundle").manifest
    configs = manifest["configs"]
    assert configs["distill"]["to_steps"] == 2 and configs["distill"]["lr"] == 1e-4
    assert len(configs["distill_resumes"]) == 1
    assert configs["distill_resumes"][0]["lr"] == 5e-5
    assert configs["distill_resumes"][0]["round_iters"] == {"1": 3}
    made_by = {s["steps"]: (s["config"], s["iters"]) for s in manifest["students"]}
    assert made_by == {2: ("distill", 2), 1: ("distill_resumes[0]", 3)}


def test_resume_continues_after_the_fewest_step_student_and_never_remakes_dropped_ones(
        tmp_path):
    """A bundle cut down with copy-bundle (the embedded one keeps 1, 2, 4, 8, 16 of a run from
    256) must not have its dropped rounds re-made from its 1-step student on --resume."""
    from halfstep.distill.bundle import Bundle, BundleError
    from halfstep.distill.bundle_copy import copy_bundle
    from halfstep.distill.progressive import distill_run

    teacher = str(train_tiny_teacher(tmp_path / "teacher"))
    common = dict(teacher=teacher, from_steps=8, iters_per_round=1, batch_size=4,
                  probe_size=2)
    distill_run(DistillConfig(**common, out=str(tmp_path / "full")), progress=False)
    assert Bundle(tmp_path / "full").student_steps == [1, 2, 4]

    only_1 = copy_bundle(tmp_path / "full", tmp_path / "only-1", students=[1])
    before = (only_1 / "bundle.json").read_text()
    distill_run(DistillConfig(**common, out=str(only_1)), resume=True, progress=False)
    assert (only_1 / "bundle.json").read_text() == before  # nothing left to make
    assert sorted(p.name for p in only_1.glob("student-*")) == ["student-1.safetensors"]

    only_4 = copy_bundle(tmp_path / "full", tmp_path / "only-4", students=[4])
    distill_run(DistillConfig(**common, out=str(only_4)), resume=True, progress=False)
    resumed = Bundle(only_4)
    assert resumed.student_steps == [1, 2, 4]
    assert [s["config"] for s in resumed.manifest["students"]] == [
        "distill_resumes[0]", "distill_resumes[0]", "distill"]

    again = copy_bundle(tmp_path / "full", tmp_path / "only-4-again", students=[4])
    before = (again / "bundle.json").read_text()
    with pytest.raises(BundleError, match="fewest-step student has 4 steps.*--from-steps 4"):
        distill_run(DistillConfig(**{**common, "from_steps": 2}, out=str(again)), resume=True,
                    progress=False)
    assert (again / "bundle.json").read_text() == before


def _interrupt_after(monkeypatch, calls: int) -> list[int]:
    """Make the distillation loss raise on its `calls`-th call (a killed job); returns the
    running count of calls."""
    import halfstep.distill.progressive as progressive

    real, seen = progressive.distillation_loss, []

    def counted(*args, **kwargs):
        seen.append(1)
        if len(seen) == calls:
            raise KeyboardInterrupt("interrupted by the test")
        return real(*args, **kwargs)

    monkeypatch.setattr(progressive, "distillation_loss", counted)
    return seen


def test_an_interrupted_round_continues_from_its_last_save_to_the_same_student(
        tmp_path, monkeypatch):
    """A round killed at iteration 5 of 7 with saves every 2 continues at iteration 4 on
    --resume (3 iterations run, not 7) and ends with the student of an uninterrupted round."""
    from halfstep.distill.bundle import Bundle
    from halfstep.distill.progressive import distill_run

    teacher = str(train_tiny_teacher(tmp_path / "teacher"))
    common = dict(teacher=teacher, from_steps=4, to_steps=2, iters_per_round=7,
                  batch_size=4, probe_size=2, checkpoint_every=2, lr=1e-3)
    distill_run(DistillConfig(**common, out=str(tmp_path / "whole")), progress=False)

    cut = tmp_path / "cut"
    _interrupt_after(monkeypatch, 5)  # iterations 0-3 ran; the save after iteration 4 is next
    with pytest.raises(KeyboardInterrupt):
        distill_run(DistillConfig(**common, out=str(cut)), progress=False)
    assert (cut / "round-4to2.partial.pt").is_file()
    assert not (cut / "student-2.safetensors").exists()

    seen = _interrupt_after(monkeypatch, 0)  # counts only
    distill_run(DistillConfig(**common, out=str(cut)), resume=True, progress=False)
    assert len(seen) == 3  # iterations 4, 5, 6
    assert not (cut / "round-4to2.partial.pt").exists()
    whole, resumed = Bundle(tmp_path / "whole"), Bundle(cut)
    a = whole.denoiser("student", 2).unet.state_dict()
    b = resumed.denoiser("student", 2).unet.state_dict()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    metrics = resumed.manifest["students"][0]["metrics"]
    assert metrics["continued_at_iter"] == 4
    assert metrics["loss_last_50"] == pytest.approx(
        whole.manifest["students"][0]["metrics"]["loss_last_50"], rel=1e-5)


def test_a_partial_round_made_with_other_settings_is_refused_not_dropped(tmp_path, monkeypatch):
    from halfstep.distill.bundle import BundleError
    from halfstep.distill.progressive import distill_run

    teacher = str(train_tiny_teacher(tmp_path / "teacher"))
    common = dict(teacher=teacher, out=str(tmp_path / "b"), from_steps=4, to_steps=2,
                  batch_size=4, probe_size=2, checkpoint_every=1)
    _interrupt_after(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        distill_run(DistillConfig(**common, iters_per_round=5), progress=False)
    partial = tmp_path / "b" / "round-4to2.partial.pt"
    saved = partial.read_bytes()
    _interrupt_after(monkeypatch, 0)
    with pytest.raises(BundleError, match=r"2 iterations .* iters 5 \(now 9\).*delete the file"):
        distill_run(DistillConfig(**common, iters_per_round=9), resume=True, progress=False)
    assert partial.read_bytes() == saved
    for damaged in (b"not a checkpoint", None):
        if damaged is None:
            torch.save([1, 2], partial)  # a torch file, but not a round's state
        else:
            partial.write_bytes(damaged)
        with pytest.raises(BundleError, match="not a readable partial round"):
            distill_run(DistillConfig(**common, iters_per_round=5), resume=True, progress=False)
