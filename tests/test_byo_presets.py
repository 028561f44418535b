"""Presets take their image shape from the data: tiny and cifar32 at 32x32x3, mnist unchanged."""

from __future__ import annotations

import pytest
import torch

from halfstep.distill.denoiser import Denoiser, ModelConfig, parameter_count
from halfstep.distill.train import TrainConfig


@pytest.mark.parametrize("preset", ["tiny", "cifar32"])
def test_presets_run_at_32x32_rgb(preset):
    cfg = TrainConfig.from_preset(preset, "folder:/x", "/out", (3, 32, 32), 10)
    assert cfg.model.image_shape == (3, 32, 32)
    torch.manual_seed(0)
    den = Denoiser(cfg.model).eval()
    with torch.no_grad():
        out = den(torch.randn(2, 3, 32, 32), torch.tensor([0.3, 0.9]), torch.tensor([1, 10]))
    assert out.shape == (2, 3, 32, 32) and torch.isfinite(out).all()
    if preset == "cifar32":
        assert 1.0e6 < parameter_count(den) < 2.0e6


def test_mnist_preset_model_is_unchanged():
    """An MNIST run resumed with `--preset mnist` must rebuild exactly the network it saved."""
    cfg = TrainConfig.from_preset("mnist", "mnist:/m", "/out", (1, 28, 28), 10)
    assert cfg.model.to_dict() == ModelConfig().to_dict()
    assert (cfg.max_steps, cfg.batch_size, cfg.lr, cfg.ema_decay) == (6000, 64, 2e-4, 0.9995)


def test_image_size_must_fit_the_unet_depth():
    with pytest.raises(ValueError, match="image size 28 must be divisible by 8"):
        TrainConfig.from_preset("cifar32", "mnist:/m", "/out", (1, 28, 28), 10)
