import math

import pytest
import torch

from halfstep.distill.schedule import CosineSchedule, time_grid


def test_variance_preserving_and_cosine_inside_clip():
    s = CosineSchedule()
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(alpha**2 + sigma**2, torch.ones_like(t), rtol=0, atol=1e-12)
    # Clipping log-SNR to [-20, 20] shifts the curve by at most alpha_1 = sigmoid(-20)^0.5 ~ 4.5e-5.
    torch.testing.assert_close(alpha, torch.cos(math.pi * t / 2), rtol=0, atol=5e-5)


def test_log_snr_is_clipped_and_decreasing():
    s = CosineSchedule()
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = s.log_snr(t)
    assert lam[0].item() == pytest.approx(20.0, abs=1e-9)
    assert lam[-1].item() == pytest.approx(-20.0, abs=1e-9)
    assert torch.all(lam[1:] < lam[:-1])
    alpha, sigma = s.alpha_sigma(torch.tensor([0.0, 1.0], dtype=torch.float64))
    assert sigma[0] > 0 and alpha[1] > 0  # never an exact zero to divide by
    assert alpha[1].item() == pytest.approx(4.54e-5, rel=1e-2)


def test_log_snr_matches_definition():
    s = CosineSchedule()
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    alpha, sigma = s.alpha_sigma(t)
    torch.testing.assert_close(torch.log(alpha**2 / sigma**2), s.log_snr(t))


def test_schedule_round_trips_and_validates():
    s = CosineSchedule(-15.0, 15.0)
    assert CosineSchedule.from_dict(s.to_dict()) == s
    with pytest.raises(ValueError, match="below"):
        CosineSchedule(5.0, -5.0)
    with pytest.raises(ValueError, match="cosine"):
        CosineSchedule.from_dict({"name": "linear", "logsnr_min": -1, "logsnr_max": 1})


def test_time_grid():
    assert time_grid(4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    with pytest.raises(ValueError):
        time_grid(0)
