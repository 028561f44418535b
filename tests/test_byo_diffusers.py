"""`halfstep import-diffusers`: a diffusers UNet2DModel + DDPM/DDIM scheduler as a teacher run."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from halfstep.cli import main
from halfstep.distill.bundle import Bundle
from halfstep.distill.diffusers_import import DiffusersError, import_diffusers
from halfstep.distill.schedule import DiscreteSchedule
from halfstep.distill.train import load_run

from .test_byo_rgb import write_images


@pytest.mark.parametrize("kind", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_discrete_schedule_matches_diffusers(kind):
    ref = DDPMScheduler(num_train_timesteps=100, beta_schedule=kind).alphas_cumprod.double()
    sched = DiscreteSchedule(kind, 0.0001, 0.02, 100)
    torch.testing.assert_close(sched.alphas_cumprod(), ref, atol=1e-6, rtol=1e-5)
    t = torch.arange(100, dtype=torch.float64) / 99
    alpha, sigma = sched.alpha_sigma(t)
    torch.testing.assert_close(alpha, ref.sqrt(), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones(100, dtype=torch.float64))
    lam = sched.log_snr(torch.linspace(0, 1, 1001))
    assert (lam[1:] < lam[:-1]).all()  # monotone between the steps too


def save_diffusers(root, prediction="v_prediction", classes=2, scheduler=DDPMScheduler):
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                       attention_head_dim=8, num_class_embeds=classes)
    unet.save_pretrained(root / "unet")
    scheduler(num_train_timesteps=50, beta_schedule="scaled_linear", beta_start=0.00085,
              beta_end=0.012, prediction_type=prediction).save_pretrained(root / "scheduler")
    return unet.eval()


@pytest.mark.parametrize("prediction, scheduler", [("v_prediction", DDPMScheduler),
                                                   ("epsilon", DDIMScheduler),
                                                   ("sample", DDPMScheduler)])
def test_imported_denoiser_is_the_diffusers_model(tmp_path, prediction, scheduler):
    unet = save_diffusers(tmp_path / "src", prediction, scheduler=scheduler)
    assert main(["import-diffusers", str(tmp_path / "src"), "--out", str(tmp_path / "run")]) == 0
    cfg, den = load_run(tmp_path / "run")
    assert (cfg.model.num_labels, cfg.model.image_shape) == (2, (3, 8, 8))
    assert cfg.model.time_input == "(T-1)t" and cfg.model.schedule["name"] == "discrete"
    abar = DDPMScheduler.from_pretrained(tmp_path / "src" / "scheduler").alphas_cumprod
    z, k = torch.randn(2, 3, 8, 8), 20
    labels = torch.tensor([1, 0])
    with torch.no_grad():
        got = den(z, torch.tensor(k / 49), labels)
        out = unet(z, torch.full((2,), float(k)), class_labels=labels).sample
        den(z, torch.tensor(0.5), torch.tensor([2, 2]))  # K = "no label" runs (the mean row)
    a, s = abar[k].sqrt(), (1 - abar[k]).sqrt()
    want = {"v_prediction": a * z - s * out, "epsilon": (z - s * out) / a, "sample": out}
    torch.testing.assert_close(got, want[prediction], atol=1e-4, rtol=1e-4)


def test_imported_teacher_distills_and_exports(tmp_path):
    save_diffusers(tmp_path / "src")
    data = write_images(tmp_path / "imgs", per_class=4)
    run = import_diffusers(tmp_path / "src", tmp_path / "run", data=f"folder:{data}?size=8")
    bundle = tmp_path / "bundle"
    assert main(["distill", "--teacher", str(run), "--out", str(bundle), "--from-steps", "4",
                 "--to-steps", "2", "--iters-per-round", "2", "--batch-size", "4"]) == 0
    b = Bundle(bundle)
    assert b.image_shape == (3, 8, 8) and b.manifest["time_input"] == "(T-1)t"
    assert main(["export", "--bundle", str(bundle), "--format", "onnx", "--max-batch", "2"]) == 0


def test_import_errors_name_the_file(tmp_path):
    save_diffusers(tmp_path / "src", classes=None)
    path = tmp_path / "src" / "scheduler" / "scheduler_config.json"
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({**cfg, "prediction_type": "flow"}))
    with pytest.raises(DiffusersError, match="scheduler_config.json: prediction_type 'flow'"):
        import_diffusers(tmp_path / "src", tmp_path / "run")
    path.write_text(json.dumps({**cfg, "_class_name": "EulerDiscreteScheduler"}))
    with pytest.raises(DiffusersError, match="EulerDiscreteScheduler"):
        import_diffusers(tmp_path / "src", tmp_path / "run")
    with pytest.raises(DiffusersError, match="no scheduler_config.json"):
        import_diffusers(tmp_path / "src" / "unet", tmp_path / "run")
    path.write_text(json.dumps(cfg))  # restored: an unconditional UNet imports with K = 0
    cfg_run, den = load_run(import_diffusers(tmp_path / "src", tmp_path / "run"))
    assert cfg_run.model.num_labels == 0 and den.unet.class_embedding is None
