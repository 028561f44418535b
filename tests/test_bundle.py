"""Bundles: verification names the bad file; writes are atomic; step lookups are clear."""

import json
import shutil

import pytest
import torch

from halfstep.distill.bundle import Bundle, BundleError, add_student, update_manifest
from halfstep.distill.io import atomic_save_safetensors
from tests.conftest import build_tiny_bundle, tiny_denoiser


@pytest.fixture
def bundle_copy(tiny_bundle_dir, tmp_path):
    return shutil.copytree(tiny_bundle_dir, tmp_path / "b")


def test_manifest_is_self_describing(tiny_bundle):
    m = tiny_bundle.manifest
    for key in ("format_version", "image_shape", "num_labels", "schedule", "parameterization",
                "time_input", "teacher", "students", "configs", "exports"):
        assert key in m
    assert tiny_bundle.student_steps == [1, 2, 4, 8]
    assert all(len(s["sha256"]) == 64 for s in m["students"])
    assert m["teacher"]["max_steps"] == 64


def test_student_for_budget_picks_largest_that_fits(tiny_bundle):
    assert tiny_bundle.student_for_budget(8) == 8
    assert tiny_bundle.student_for_budget(7) == 4
    assert tiny_bundle.student_for_budget(1000) == 8
    with pytest.raises(BundleError, match="available: 1, 2, 4, 8"):
        tiny_bundle.student_for_budget(0)
    with pytest.raises(BundleError, match="available: 1, 2, 4, 8"):
        tiny_bundle.check_steps("student", 3)
    with pytest.raises(BundleError, match="1..64"):
        tiny_bundle.check_steps("teacher", 65)


def test_corrupted_weights_are_detected(bundle_copy):
    path = bundle_copy / "student-4.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="student-4.safetensors"):
        Bundle(bundle_copy)


def test_missing_file_and_bad_manifest(bundle_copy, tmp_path):
    (bundle_copy / "teacher.safetensors").unlink()
    with pytest.raises(BundleError, match="missing.*teacher.safetensors"):
        Bundle(bundle_copy)
    with pytest.raises(BundleError, match="not a halfstep bundle"):
        Bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle(tmp_path)


def test_wrong_shapes_are_detected(bundle_copy):
    wrong = tiny_denoiser(block_out_channels=(16, 16), norm_num_groups=8)
    sha = atomic_save_safetensors(wrong.unet.state_dict(), bundle_copy / "student-2.safetensors")

    def fix_sha(m):
        next(s for s in m["students"] if s["steps"] == 2)["sha256"] = sha

    update_manifest(bundle_copy, fix_sha)
    with pytest.raises(BundleError, match="student-2.safetensors has wrong tensor"):
        Bundle(bundle_copy)


def test_paths_cannot_escape_the_bundle(bundle_copy):
    update_manifest(bundle_copy, lambda m: m["teacher"].update(file="../../etc/passwd"))
    with pytest.raises(BundleError, match="outside the bundle"):
        Bundle(bundle_copy)


def test_interrupted_write_leaves_previous_bundle_loadable(bundle_copy, monkeypatch):
    before = (bundle_copy / "bundle.json").read_text()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr("halfstep.distill.io.save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        add_student(bundle_copy, 4, tiny_denoiser(9).unet.state_dict(), {})
    assert (bundle_copy / "bundle.json").read_text() == before
    assert not list(bundle_copy.glob(".*.tmp"))
    Bundle(bundle_copy)  # still verifies


def test_loaded_denoisers_sample(tiny_bundle):
    den = tiny_bundle.denoiser("student", 2)
    assert den is tiny_bundle.denoiser("student", 2)  # cached
    out = den(torch.zeros(1, 1, 28, 28), torch.tensor([0.5]), torch.tensor([10]))
    assert out.shape == (1, 1, 28, 28)


def test_format_version_is_checked(bundle_copy):
    m = json.loads((bundle_copy / "bundle.json").read_text())
    m["format_version"] = 99
    (bundle_copy / "bundle.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="format_version 99"):
        Bundle(bundle_copy)


def test_replacing_a_student_keeps_one_entry(tmp_path):
    root = build_tiny_bundle(tmp_path / "b", steps=(2,))
    add_student(root, 2, tiny_denoiser(5).unet.state_dict(), {"note": "again"})
    b = Bundle(root)
    assert b.student_steps == [2] and b.manifest["students"][0]["note"] == "again"


def test_copy_bundle_keeps_chosen_students(tiny_bundle_dir, tmp_path):
    from halfstep.distill.bundle_copy import copy_bundle

    dst = copy_bundle(tiny_bundle_dir, tmp_path / "small", students=[1, 4])
    b = Bundle(dst)
    assert b.student_steps == [1, 4] and not (dst / "student-2.safetensors").exists()
    with pytest.raises(BundleError, match="already holds a bundle"):
        copy_bundle(tiny_bundle_dir, dst)
    with pytest.raises(BundleError, match=r"no students \[3\]"):
        copy_bundle(tiny_bundle_dir, tmp_path / "other", students=[3])


def _same_teacher_bundle_with_new_student_1(src, root):
    """A copy of `src` whose 1-step student was re-made by a resumed run (new weights)."""
    shutil.copytree(src, root)
    update_manifest(root, lambda m: m["configs"].setdefault("distill_resumes", []).append(
        {"round_iters": {"1": 6000}}))
    add_student(root, 1, tiny_denoiser(99).unet.state_dict(),
                {"distilled_from": 2, "config": "distill_resumes[0]"})
    return root


def test_copy_bundle_takes_a_student_from_another_bundle_of_the_same_teacher(
        tiny_bundle_dir, tmp_path):
    from halfstep.distill.bundle_copy import copy_bundle

    other = _same_teacher_bundle_with_new_student_1(tiny_bundle_dir, tmp_path / "longer")
    dst = copy_bundle(tiny_bundle_dir, tmp_path / "mixed", students=[1, 2], take={1: other})
    mixed, source, donor = Bundle(dst), Bundle(tiny_bundle_dir), Bundle(other)
    assert mixed.student_steps == [1, 2]
    assert mixed.weights_sha256("student", 1) == donor.weights_sha256("student", 1)
    assert mixed.weights_sha256("student", 1) != source.weights_sha256("student", 1)
    assert mixed.weights_sha256("student", 2) == source.weights_sha256("student", 2)
    x = torch.randn(1, *mixed.image_shape)
    assert torch.equal(mixed.denoiser("student", 1)(x, 0.5), donor.denoiser("student", 1)(x, 0.5))
    entry = mixed.manifest["students"][0]
    assert entry["config"] == "taken[0]"
    taken = mixed.manifest["configs"]["taken"][0]
    assert taken["bundle"] == str(other) and taken["config_there"] == "distill_resumes[0]"
    assert taken["config"] == {"round_iters": {"1": 6000}}
    # without --students: every source student, the taken one replacing its own
    assert Bundle(copy_bundle(tiny_bundle_dir, tmp_path / "all", take={1: other})).student_steps \
        == source.student_steps


def test_copy_bundle_refuses_students_it_cannot_take(tiny_bundle_dir, tmp_path):
    from halfstep.distill.bundle_copy import copy_bundle

    other = _same_teacher_bundle_with_new_student_1(tiny_bundle_dir, tmp_path / "longer")
    stranger = build_tiny_bundle(tmp_path / "stranger", seed=5)
    cases = [
        ({"take": {1: stranger}}, "another teacher"),
        ({"take": {16: other}}, "has no student 16"),
        ({"take": {1: other}, "students": [2, 4]}, r"taken from other bundles but not in"),
    ]
    for i, (kwargs, message) in enumerate(cases):
        with pytest.raises(BundleError, match=message):
            copy_bundle(tiny_bundle_dir, tmp_path / f"dst{i}", **kwargs)
        assert not (tmp_path / f"dst{i}").exists()  # refused before anything is written


def test_copy_bundle_command_takes_students_and_refuses_in_one_line(
        tiny_bundle_dir, tmp_path, capsys):
    from halfstep.cli import main

    other = _same_teacher_bundle_with_new_student_1(tiny_bundle_dir, tmp_path / "longer")
    assert main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "mixed"),
                 "--take", f"1={other}"]) == 0
    assert Bundle(tmp_path / "mixed").weights_sha256("student", 1) \
        == Bundle(other).weights_sha256("student", 1)
    stranger = build_tiny_bundle(tmp_path / "stranger", seed=5)
    capsys.readouterr()
    assert main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "bad"),
                 "--take", f"1={stranger}"]) == 2
    err = capsys.readouterr().err
    assert "another teacher" in err and err.count("\n") == 1, err
    assert main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "bad"),
                 "--take", f"1={other}", "--take", f"1={other}"]) == 2
    assert "same student twice" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "bad"), "--take", "one=x"])
    assert exit_info.value.code == 2 and "expected STEPS=BUNDLE" in capsys.readouterr().err


def test_written_files_are_world_readable(tiny_bundle_dir):
    for path in tiny_bundle_dir.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, path


def _edit(root, change) -> None:
    m = json.loads((root / "bundle.json").read_text())
    change(m)
    (root / "bundle.json").write_text(json.dumps(m))


def _set_model(**fields):
    def change(m):
        m["model"].update(fields)
        if "channels" in fields or "image_size" in fields:
            size = m["model"]["image_size"]
            m["image_shape"] = [m["model"]["channels"], size, size]
        if "num_labels" in fields:
            m["num_labels"] = fields["num_labels"]

    return change


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.pop("students"), r"field 'students' is missing"),
        (lambda m: m.pop("image_shape"), r"field 'image_shape' is missing"),
        (lambda m: m.update(students={}), r"field 'students' must be list"),
        (lambda m: m.update(num_labels="10"), r"field 'num_labels' must be int"),
        (lambda m: m.update(image_shape=[1, 28]), r"field 'image_shape' must be \[channels"),
        (lambda m: m.update(image_shape=[3, 28, 28]), r"'image_shape' is \[3, 28, 28\] but model"),
        (lambda m: m.update(image_shape=[1, 32, 32]), r"'image_shape' is \[1, 32, 32\] but model"),
        (lambda m: m.update(image_shape=[1, 28, 32]), r"'image_shape' must be square"),
        (lambda m: m.update(num_labels=3), r"'num_labels' is 3 but model.num_labels is 10"),
        (lambda m: m["teacher"].pop("sha256"), r"field 'teacher.sha256' must be 64"),
        (lambda m: m["teacher"].update(max_steps=0), r"field 'teacher.max_steps' must be an int"),
        (lambda m: m["students"][1].update(steps="2"), r"field 'students\[1\].steps'"),
        (lambda m: m["students"][1].update(steps=1), r"'students\[1\].steps' repeats steps=1"),
        (lambda m: m["students"][0].pop("file"), r"field 'students\[0\].file'"),
        (lambda m: m.update(exports=[3]), r"field 'exports\[0\]'"),
        # the weights' headers disagree with a self-consistent manifest
        (_set_model(channels=3), r"'image_shape' says 3 channel\(s\) but teacher.safetensors"),
        (_set_model(num_labels=4), r"'num_labels' is 4 but teacher.safetensors has 11 class"),
        (_set_model(image_size=27), r"bad model config: image size 27 must be divisible by 2"),
    ],
)
def test_bad_manifests_name_the_field_and_file(bundle_copy, change, message):
    _edit(bundle_copy, change)
    with pytest.raises(BundleError, match=message) as info:
        Bundle(bundle_copy)
    assert "bundle.json" in str(info.value) or ".safetensors" in str(info.value)


def test_manifest_that_is_not_an_object(bundle_copy):
    (bundle_copy / "bundle.json").write_text("[1, 2]")
    with pytest.raises(BundleError, match="expected a JSON object"):
        Bundle(bundle_copy)
