import pytest
import torch

from halfstep.distill.losses import WeightedXLoss
from halfstep.distill.parameterization import (
    eps_from_x_hat,
    output_channels,
    v_from_x_eps,
    x_hat_from_output,
)
from halfstep.distill.schedule import CosineSchedule


@pytest.fixture
def sample():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    eps = torch.randn(4, 1, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([0.05, 0.3, 0.7, 0.95], dtype=torch.float64)
    alpha, sigma = (v.view(-1, 1, 1, 1) for v in CosineSchedule().alpha_sigma(t))
    return x, eps, alpha, sigma, alpha * x + sigma * eps


def test_ideal_outputs_recover_x(sample):
    x, eps, alpha, sigma, z = sample
    ideal = {
        "v": v_from_x_eps(x, eps, alpha, sigma),
        "x": x,
        "eps": eps,
        # `both`: x~ = x and eps~ = eps give sigma^2 x + alpha^2 x = x.
        "both": torch.cat([x, eps], dim=1),
    }
    for name, out in ideal.items():
        x_hat = x_hat_from_output(name, out, z, alpha, sigma)
        torch.testing.assert_close(x_hat, x, rtol=0, atol=1e-9, msg=name)
        torch.testing.assert_close(eps_from_x_hat(z, x_hat, alpha, sigma), eps, rtol=0, atol=1e-6)


def test_unknown_parameterization_is_rejected(sample):
    x, _, alpha, sigma, z = sample
    with pytest.raises(ValueError, match="choose one of"):
        x_hat_from_output("score", x, z, alpha, sigma)
    assert output_channels("both", 3) == 6 and output_channels("v", 3) == 3


def test_loss_weightings():
    lam = torch.tensor([-2.0, 0.0, 3.0])
    snr = torch.exp(lam)
    torch.testing.assert_close(WeightedXLoss("snr_trunc").weight(lam), torch.clamp(snr, min=1))
    torch.testing.assert_close(WeightedXLoss("snr_plus_one").weight(lam), snr + 1)
    torch.testing.assert_close(WeightedXLoss("snr").weight(lam), snr)
    with pytest.raises(ValueError, match="weighting"):
        WeightedXLoss("uniform")


def test_truncated_snr_is_max_of_x_and_eps_mse(sample):
    x, eps, alpha, sigma, z = sample
    x_hat = x + 0.1 * torch.randn_like(x)
    eps_hat = eps_from_x_hat(z, x_hat, alpha, sigma)
    lam = torch.log(alpha**2 / sigma**2).flatten()
    per = lambda a, b: (a - b).pow(2).flatten(1).mean(1)
    expected = torch.maximum(per(x, x_hat), per(eps, eps_hat)).mean()
    torch.testing.assert_close(WeightedXLoss("snr_trunc")(x, x_hat, lam), expected)
