"""`halfstep export --format diffusers`: each student as a folder diffusers loads by itself,
whose pipeline gives halfstep's own images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel

from halfstep.cli import main
from halfstep.distill.bundle import Bundle, add_student, create_bundle
from halfstep.distill.diffusers_import import import_diffusers
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import noise_for_seeds
from halfstep.distill.train import load_run
from halfstep.export.diffusers import DiffusersExportError, export_student

from .test_byo_diffusers import save_diffusers

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach a hub


def load_pipeline(folder: Path, explicit: bool = True) -> DiffusionPipeline:
    """Through diffusers' custom-pipeline loading: the shipped pipeline.py, named or found
    through model_index.json's _class_name."""
    extra = {"custom_pipeline": str(folder / "pipeline.py")} if explicit else {}
    return DiffusionPipeline.from_pretrained(folder, trust_remote_code=True, **extra)


def assert_round_trip(bundle_dir: Path, out: Path, steps: int, labels: torch.Tensor) -> None:
    bundle = Bundle(bundle_dir)
    noise = noise_for_seeds(list(range(10, 10 + len(labels))), bundle.image_shape)
    want = reference_images(bundle, "student", steps, noise, labels)
    for explicit in (True, False):
        pipe = load_pipeline(out / f"student-{steps}", explicit)
        got = pipe(noise=noise, class_labels=labels, output_type="raw").images
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    pil = pipe(noise=noise, class_labels=labels).images  # the default PIL output
    assert len(pil) == len(labels) and pil[0].size == bundle.image_shape[1:][::-1]


def test_tiny_bundle_round_trip(tiny_bundle_dir, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "diffusers",
                 "--out", str(out), "--steps", "1,2,4"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["student-1", "student-2", "student-4"]
    folder = out / "student-4"
    unet = UNet2DModel.from_pretrained(folder / "unet")
    assert unet.config.num_class_embeds == 11  # K = 10 labels + "no label"
    assert (folder / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    info = json.loads((folder / "halfstep.json").read_text())
    assert info["weights_sha256"] == Bundle(tiny_bundle_dir).weights_sha256("student", 4)
    assert info["parity_max_abs"] <= 1e-4 and info["time_input"] == "1000t"
    config = json.loads((folder / "model_index.json").read_text())
    assert (config["steps"], config["time_scale"]) == (4, 1000)
    assert config["schedule"]["name"] == "cosine"
    assert "import halfstep" not in (folder / "pipeline.py").read_text()
    assert_round_trip(tiny_bundle_dir, out, 4, torch.tensor([0, 3, 9, 10]))
    assert_round_trip(tiny_bundle_dir, out, 1, torch.tensor([5, 10]))
    pipe = load_pipeline(out / "student-2")
    gen = pipe(batch_size=3, class_labels=7, generator=torch.Generator().manual_seed(1),
               output_type="np").images
    assert gen.shape == (3, 28, 28, 1) and 0 <= gen.min() and gen.max() <= 1
    assert "exports" in Bundle(tiny_bundle_dir).manifest  # not recorded: the bundle is unchanged
    assert Bundle(tiny_bundle_dir).manifest["exports"] == []


def imported_bundle(tmp_path: Path, prediction: str) -> Path:
    """A bundle whose teacher and 2-step student are an imported diffusers model (discrete
    schedule, (T-1)t time input), built without distilling."""
    save_diffusers(tmp_path / "src", prediction)
    cfg, den = load_run(import_diffusers(tmp_path / "src", tmp_path / "run"))
    root = tmp_path / "bundle"
    state = den.unet.state_dict()
    create_bundle(root, "imported", cfg.model, state, default_steps=8, max_steps=16, configs={})
    torch.manual_seed(3)  # the student: the teacher's weights, slightly moved
    add_student(root, 2, {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}, {})
    return root


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_imported_teacher_student_round_trip(tmp_path, prediction):
    root = imported_bundle(tmp_path, prediction)
    out = tmp_path / "hf"
    assert main(["export", "--bundle", str(root), "--format", "diffusers",
                 "--out", str(out)]) == 0
    config = json.loads((out / "student-2" / "model_index.json").read_text())
    assert config["time_scale"] == 49 and config["schedule"]["name"] == "discrete"
    assert len(config["schedule"]["log_snr"]) == 50
    assert config["parameterization"] == {"epsilon": "eps", "v_prediction": "v"}[prediction]
    assert_round_trip(root, out, 2, torch.tensor([0, 1, 2, 1]))


def test_reexport_replaces_and_failed_parity_keeps_the_old_folder(tiny_bundle_dir, tmp_path,
                                                                   monkeypatch):
    out = tmp_path / "hf"
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "diffusers",
                 "--out", str(out), "--steps", "1"]) == 0
    (out / "student-1" / "stray.txt").write_text("old")
    assert main(["export", "--bundle", str(tiny_bundle_dir), "--format", "diffusers",
                 "--out", str(out), "--steps", "1"]) == 0
    assert not (out / "student-1" / "stray.txt").exists()
    before = (out / "student-1" / "halfstep.json").read_text()
    import halfstep.export.diffusers as mod

    monkeypatch.setattr(mod, "parity", lambda *a: 1.0)
    with pytest.raises(DiffusersExportError, match="max abs error 1 > 0.0001; not written"):
        export_student(Bundle(tiny_bundle_dir), 1, out)
    assert (out / "student-1" / "halfstep.json").read_text() == before
    assert sorted(p.name for p in out.iterdir()) == ["student-1"]  # no staging left behind


def test_cli_arguments(tiny_bundle_dir, tmp_path, capsys):
    base = ["export", "--bundle", str(tiny_bundle_dir), "--format"]
    cases = [(["diffusers"], "needs --out"),
             (["onnx", "--out", "x"], "--out applies to --format diffusers only"),
             (["diffusers", "--out", str(tmp_path), "--opset", "17"], "do not apply"),
             (["diffusers", "--out", str(tmp_path / "o"), "--steps", "3"], "steps=3")]
    for args, message in cases:
        assert main(base + args) != 0
        assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


@pytest.mark.parametrize("parameterization", ["x", "both"])
def test_other_parameterizations_round_trip(tmp_path, parameterization):
    from .conftest import tiny_denoiser

    cfg = dict(image_size=8, block_out_channels=(8, 8), parameterization=parameterization)
    teacher = tiny_denoiser(0, **cfg)
    root = tmp_path / "bundle"
    create_bundle(root, "p", teacher.config, teacher.unet.state_dict(), default_steps=4,
                  max_steps=8, configs={})
    add_student(root, 2, tiny_denoiser(1, **cfg).unet.state_dict(), {})
    assert main(["export", "--bundle", str(root), "--format", "diffusers",
                 "--out", str(tmp_path / "hf")]) == 0
    assert_round_trip(root, tmp_path / "hf", 2, torch.tensor([1, 10]))
