"""Weights stored narrower than they run: `copy-bundle --dtype float16`, what bundles accept."""

from __future__ import annotations

import shutil

import pytest
import torch

from halfstep.cli import main
from halfstep.distill.bundle import Bundle, BundleError, update_manifest
from halfstep.distill.bundle_copy import copy_bundle
from halfstep.distill.io import atomic_save_safetensors


def _weight_bytes(root) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def test_a_float16_copy_is_half_the_size_and_runs_in_float32(tiny_bundle_dir, tmp_path, capsys):
    assert main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "h"),
                 "--dtype", "float16"]) == 0
    half, full = Bundle(tmp_path / "h"), Bundle(tiny_bundle_dir)
    assert half.student_steps == full.student_steps
    assert _weight_bytes(tmp_path / "h") < 0.55 * _weight_bytes(tiny_bundle_dir)
    entries = [half.manifest["teacher"], *half.manifest["students"]]
    assert {e["stored_as"] for e in entries} == {"float16"}
    assert half.weights_sha256("student", 1) != full.weights_sha256("student", 1)

    x, t = torch.randn(2, *half.image_shape), torch.full((2,), 0.5)
    for model, steps in (("student", 1), ("teacher", None)):
        den = half.denoiser(model, steps)
        assert {p.dtype for p in den.parameters()} == {torch.float32}
        with torch.no_grad():
            a, b = den(x, t), full.denoiser(model, steps)(x, t)
        assert not torch.equal(a, b)  # the weights were rounded ...
        assert torch.allclose(a, b, atol=2e-2)  # ... to float16's precision, nothing more
        for p, q in zip(den.parameters(), full.denoiser(model, steps).parameters(), strict=True):
            assert torch.equal(p, q.half().float())

    # and back: float32 again holds exactly the float16 values
    back = Bundle(copy_bundle(tmp_path / "h", tmp_path / "f", dtype="float32"))
    assert torch.equal(back.denoiser("student", 1)(x, t), half.denoiser("student", 1)(x, t))


def test_weights_float16_cannot_hold_are_refused_before_anything_is_written(tiny_bundle_dir,
                                                                            tmp_path):
    src = shutil.copytree(tiny_bundle_dir, tmp_path / "big")
    state = Bundle(src).denoiser("student", 2).unet.state_dict()
    state["conv_out.bias"] = torch.full_like(state["conv_out.bias"], 1e6)
    sha = atomic_save_safetensors(state, src / "student-2.safetensors")
    update_manifest(src, lambda m: next(s for s in m["students"] if s["steps"] == 2)
                    .update(sha256=sha))
    with pytest.raises(BundleError, match="conv_out.bias has values beyond float16's range"):
        copy_bundle(src, tmp_path / "h", dtype="float16")
    assert not (tmp_path / "h").exists()
    # bfloat16 has float32's range
    assert Bundle(copy_bundle(src, tmp_path / "b", dtype="bfloat16")).student_steps


def test_an_unknown_dtype_is_one_line(tiny_bundle_dir, tmp_path, capsys):
    assert main(["copy-bundle", str(tiny_bundle_dir), str(tmp_path / "h"),
                 "--dtype", "int8"]) == 2
    err = capsys.readouterr().err
    assert "--dtype must be one of float32, float16, bfloat16" in err and err.count("\n") == 1
    assert not (tmp_path / "h").exists()


def test_a_bundle_with_integer_weights_is_refused_on_load(tiny_bundle_dir, tmp_path):
    src = shutil.copytree(tiny_bundle_dir, tmp_path / "ints")
    state = Bundle(src).denoiser("student", 1).unet.state_dict()
    sha = atomic_save_safetensors({k: v.to(torch.int32) for k, v in state.items()},
                                  src / "student-1.safetensors")
    update_manifest(src, lambda m: m["students"][0].update(sha256=sha))
    with pytest.raises(BundleError, match=r"student-1.safetensors holds \['I32'\] tensors"):
        Bundle(src)
