"""DPM-Solver++ (Lu et al. 2022) from diffusers, adapted to our continuous cosine schedule.

diffusers' `DPMSolverMultistepScheduler` is discrete: index k of `num_train_timesteps` carries
alphas_cumprod[k]. We identify index k with continuous time t = (k + 1) / T and overwrite
alphas_cumprod (and the alpha_t / sigma_t / lambda_t buffers derived from it) with our
alpha_t^2, so the solver integrates our schedule exactly at every grid point it visits.
`timestep_spacing="trailing"` makes the first model call at k = T - 1, i.e. t = 1 (the default
"linspace"/"leading" spacings would start below t = 1, treating the pure noise z_1 as a less
noisy z_t). The denoiser is wrapped as a `prediction_type="sample"` model: it returns x_hat
clipped to [-1, 1], as in our DDIM sampler, so the two samplers differ only in the solver.
"""

from __future__ import annotations

import torch

from halfstep.distill.sampling import DenoiseFn
from halfstep.distill.schedule import CosineSchedule

# A power of two, so every power-of-two step count lands exactly on t_i = i / N.
TRAIN_TIMESTEPS = 1024


def make_scheduler(schedule: CosineSchedule, num_train_timesteps: int = TRAIN_TIMESTEPS):
    """A DPMSolverMultistepScheduler (2nd-order multistep DPM-Solver++) on our schedule."""
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(
        num_train_timesteps=num_train_timesteps,
        prediction_type="sample",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,  # first-order last steps: more stable below 15 steps
        final_sigmas_type="zero",  # the last update returns x_hat itself, as DDIM does
        timestep_spacing="trailing",
        thresholding=False,  # we clip x_hat ourselves, like ddim_sample
    )
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    alpha, sigma = schedule.alpha_sigma(t)
    sched.alphas_cumprod = (alpha**2).float()
    sched.alpha_t = alpha.float()
    sched.sigma_t = sigma.float()
    sched.lambda_t = (alpha.log() - sigma.log()).float()
    sched.sigmas = (sigma / alpha).float()
    return sched


def scheduler_time(timestep: torch.Tensor | int, num_train_timesteps: int = TRAIN_TIMESTEPS,
                   ) -> float:
    """Continuous t for the scheduler's discrete index k: t = (k + 1) / T."""
    return (int(timestep) + 1) / num_train_timesteps


@torch.no_grad()
def dpm_solver_sample(denoise: DenoiseFn, noise: torch.Tensor, labels: torch.Tensor | None,
                      steps: int, schedule: CosineSchedule, clip: bool = True) -> torch.Tensor:
    """x_0 from z_1 = noise with `steps` model calls of DPM-Solver++(2M)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    sched = make_scheduler(schedule)
    sched.set_timesteps(steps)
    z = noise  # VP schedule: z_1 = alpha_1 x + sigma_1 eps ~ eps, init_noise_sigma = 1
    for k in sched.timesteps:
        t_vec = torch.full((z.shape[0],), scheduler_time(k), dtype=torch.float32, device=z.device)
        x_hat = denoise(z, t_vec, labels)
        if clip:
            x_hat = x_hat.clamp(-1.0, 1.0)
        z = sched.step(x_hat, k, z).prev_sample.to(noise.dtype)
    return z
