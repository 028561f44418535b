import torch

from halfstep.distill.sampling import ancestral_sample, ddim_sample, ddim_step, noise_for_seeds
from halfstep.distill.schedule import CosineSchedule
from tests.conftest import tiny_denoiser


def test_ddim_step_formula():
    z, xh = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    out = ddim_step(z, xh, 0.6, 0.8, 0.8, 0.6)
    torch.testing.assert_close(out, 0.8 * xh + 0.6 * (z - 0.6 * xh) / 0.8)


def test_perfect_denoiser_is_recovered_exactly():
    """With x_hat == x at every step, DDIM returns x whatever the step count."""
    x = torch.rand(3, 1, 6, 6) * 2 - 1
    noise = torch.randn_like(x)
    for steps in (1, 2, 7):
        out = ddim_sample(lambda z, t, y: x, noise, None, steps, CosineSchedule())
        torch.testing.assert_close(out, x)


def test_clipping_only_when_asked():
    big = lambda z, t, y: torch.full_like(z, 3.0)
    noise = torch.zeros(1, 1, 2, 2)
    assert ddim_sample(big, noise, None, 2, CosineSchedule()).max() == 1.0
    assert ddim_sample(big, noise, None, 2, CosineSchedule(), clip=False).max() == 3.0


def test_seeded_noise_is_per_request():
    a = noise_for_seeds([5, 6, 7], (1, 4, 4))
    b = noise_for_seeds([6], (1, 4, 4))
    assert torch.equal(a[1], b[0])
    assert not torch.equal(a[0], a[1])


def test_samplers_are_deterministic():
    den = tiny_denoiser()
    noise = noise_for_seeds([0, 1], (1, 28, 28))
    labels = torch.tensor([3, 10])
    a = ddim_sample(den, noise, labels, 3, den.schedule)
    b = ddim_sample(den, noise, labels, 3, den.schedule)
    assert torch.equal(a, b) and a.abs().max() <= 1
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    c = ancestral_sample(den, noise, labels, 3, den.schedule, generator=g1)
    d = ancestral_sample(den, noise, labels, 3, den.schedule, generator=g2)
    assert torch.equal(c, d) and not torch.equal(a, c)
