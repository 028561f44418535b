"""Samplers: small stateless functions over a Denoiser, deterministic DDIM and ancestral.

The time grid is baked in as Python floats (float64), so the loops unroll cleanly into a
CUDA graph or an ONNX graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .parameterization import eps_from_x_hat
from .schedule import CosineSchedule, time_grid

DenoiseFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def ddim_step(z_t, x_hat, alpha_t, sigma_t, alpha_s, sigma_s):
    """z_s = alpha_s x_hat + sigma_s (z_t - alpha_t x_hat) / sigma_t."""
    return alpha_s * x_hat + sigma_s * eps_from_x_hat(z_t, x_hat, alpha_t, sigma_t)


@torch.no_grad()
def ddim_sample(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    schedule: CosineSchedule,
    clip: bool = True,
) -> torch.Tensor:
    """Deterministic DDIM from z_1 = noise on t_i = i/N; the last step returns x_hat.

    With clip=True (sampling), x_hat is clipped to [-1, 1] at every step and eps_hat is
    recomputed from the clipped value, which ddim_step does implicitly.
    """
    return ddim_steps(denoise, noise, labels, steps, schedule, 0, steps, clip)


@torch.no_grad()
def ddim_steps(
    denoise: DenoiseFn,
    z: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    schedule: CosineSchedule,
    start: int,
    stop: int,
    clip: bool = True,
) -> torch.Tensor:
    """Steps start..stop-1 of `ddim_sample`'s loop, from z at grid point `start`: returns z at
    grid point `stop`, or the images (the last x_hat) when stop == steps. Running 0..k, k..m,
    ..., ..steps in turn gives ddim_sample's images bit for bit (same operations, same order)."""
    if not 0 <= start < stop <= steps:
        raise ValueError(f"need 0 <= start < stop <= steps, got {start}, {stop}, {steps}")
    grid = time_grid(steps)
    x_hat = z
    for t, s in zip(grid[start:stop], grid[start + 1:stop + 1]):
        t_vec = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
        x_hat = denoise(z, t_vec, labels)
        if clip:
            x_hat = x_hat.clamp(-1.0, 1.0)
        if s > 0:
            alpha_t, sigma_t = schedule.alpha_sigma_float(t)
            alpha_s, sigma_s = schedule.alpha_sigma_float(s)
            z = ddim_step(z, x_hat, alpha_t, sigma_t, alpha_s, sigma_s)
    return x_hat if stop == steps else z


@torch.no_grad()
def ancestral_sample(
    denoise: DenoiseFn,
    noise: torch.Tensor,
    labels: torch.Tensor | None,
    steps: int,
    schedule: CosineSchedule,
    generator: torch.Generator | None = None,
    gamma: float = 0.3,
) -> torch.Tensor:
    """Stochastic ancestral sampler for the teacher.

    Mean exp(l_t - l_s)(a_s/a_t) z_t + (1 - exp(l_t - l_s)) a_s x_hat; the log-variance is
    interpolated with weight gamma between (1 - r) sigma_s^2 and (1 - r) sigma_t^2.
    """
    grid = time_grid(steps)
    z = noise
    x_hat = noise
    for t, s in zip(grid[:-1], grid[1:]):
        t_vec = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
        x_hat = denoise(z, t_vec, labels).clamp(-1.0, 1.0)
        if s == 0:
            break
        lam_t = float(schedule.log_snr(torch.tensor(t, dtype=torch.float64)))
        lam_s = float(schedule.log_snr(torch.tensor(s, dtype=torch.float64)))
        alpha_t, sigma_t = schedule.alpha_sigma_float(t)
        alpha_s, sigma_s = schedule.alpha_sigma_float(s)
        r = math.exp(lam_t - lam_s)  # < 1 since lambda increases as t decreases
        mean = r * (alpha_s / alpha_t) * z + (1.0 - r) * alpha_s * x_hat
        log_var = (1 - gamma) * math.log((1 - r) * sigma_s**2) + gamma * math.log(
            (1 - r) * sigma_t**2
        )
        eps = torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype)
        z = mean + math.exp(0.5 * log_var) * eps
    return x_hat


def noise_for_seeds(seeds: list[int], shape: tuple[int, ...], device="cpu") -> torch.Tensor:
    """One generator per request seed, so an image never depends on its batch.

    Noise is drawn on the CPU and moved, so CPU and GPU engines see the same z_1 for a seed.
    """
    rows = [
        torch.randn(shape, generator=torch.Generator().manual_seed(int(seed))) for seed in seeds
    ]
    return torch.stack(rows).to(device)
