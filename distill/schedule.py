"""Continuous-time cosine schedule with clipped log-SNR: alpha_t, sigma_t and lambda_t.

z_t = alpha_t x + sigma_t eps, alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t).
Everything here runs in the dtype of its input: pass float32 or float64, never half.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

import torch


class LogSnrSchedule:
    """alpha_t, sigma_t from log_snr: alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)."""

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def alpha_sigma_float(self, t: float) -> tuple[float, float]:
        """Python floats (float64) for samplers that bake the time grid into constants."""
        alpha, sigma = self.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return float(alpha), float(sigma)


@dataclass(frozen=True)
class CosineSchedule(LogSnrSchedule):
    """lambda(t) = -2 log(tan(a t + b)), clipped to [logsnr_min, logsnr_max] at the ends."""

    logsnr_min: float = -20.0
    logsnr_max: float = 20.0

    def __post_init__(self) -> None:
        if not self.logsnr_min < self.logsnr_max:
            raise ValueError(
                f"logsnr_min ({self.logsnr_min}) must be below logsnr_max ({self.logsnr_max})"
            )

    @property
    def _b(self) -> float:
        return math.atan(math.exp(-0.5 * self.logsnr_max))

    @property
    def _a(self) -> float:
        return math.atan(math.exp(-0.5 * self.logsnr_min)) - self._b

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda_t for t in [0, 1]; lambda(0) = logsnr_max, lambda(1) = logsnr_min."""
        return -2.0 * torch.log(torch.tan(self._a * t + self._b))

    def to_dict(self) -> dict:
        return {"name": "cosine", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> CosineSchedule:
        if d.get("name", "cosine") != "cosine":
            raise ValueError(f"unknown schedule {d.get('name')!r}; halfstep supports 'cosine'")
        return cls(logsnr_min=float(d["logsnr_min"]), logsnr_max=float(d["logsnr_max"]))


def time_grid(steps: int) -> list[float]:
    """The sampling grid t_i = i / N for i = N..0 (N + 1 points, descending)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return [i / steps for i in range(steps, -1, -1)]


BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclass(frozen=True)
class DiscreteSchedule(LogSnrSchedule):
    """A discrete DDPM schedule (diffusers' betas, T steps) seen in continuous time.

    t in [0, 1] sits at fractional step k = t (T - 1); lambda_t interpolates the steps'
    log-SNR log(abar_k / (1 - abar_k)) linearly in k, so alpha_t, sigma_t match the discrete
    schedule exactly at every integer step and stay monotone in between.
    """

    beta_schedule: str = "linear"
    beta_start: float = 0.0001
    beta_end: float = 0.02
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}; "
                             f"halfstep reads {', '.join(BETA_SCHEDULES)}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {self.num_train_timesteps}")

    def alphas_cumprod(self) -> torch.Tensor:
        """abar_k for k = 0..T-1 in float64, as diffusers' DDPMScheduler computes them."""
        n = self.num_train_timesteps
        if self.beta_schedule == "linear":
            betas = torch.linspace(self.beta_start, self.beta_end, n, dtype=torch.float64)
        elif self.beta_schedule == "scaled_linear":
            betas = torch.linspace(self.beta_start**0.5, self.beta_end**0.5, n,
                                   dtype=torch.float64) ** 2
        else:
            def f(s: float) -> float:
                return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                                 dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)

    @functools.cached_property
    def log_snr_table(self) -> torch.Tensor:
        """lambda_k = log(abar_k / (1 - abar_k)) at every integer step, float64; computed once
        (the sampler and the loss ask for lambda several times per step)."""
        abar = self.alphas_cumprod()
        return abar.log() - torch.log1p(-abar)

    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        table = self.log_snr_table.to(device=t.device)
        k = t.to(torch.float64).clamp(0.0, 1.0) * (self.num_train_timesteps - 1)
        lo = k.floor().long().clamp(max=self.num_train_timesteps - 2)
        frac = k - lo
        return (table[lo] * (1 - frac) + table[lo + 1] * frac).to(t.dtype)

    def to_dict(self) -> dict:
        return {"name": "discrete", **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> DiscreteSchedule:
        return cls(beta_schedule=str(d["beta_schedule"]), beta_start=float(d["beta_start"]),
                   beta_end=float(d["beta_end"]),
                   num_train_timesteps=int(d["num_train_timesteps"]))


def schedule_from_dict(d: dict) -> CosineSchedule | DiscreteSchedule:
    """The schedule a model config records: 'cosine' (trained here) or 'discrete' (imported)."""
    if d.get("name") == "discrete":
        return DiscreteSchedule.from_dict(d)
    return CosineSchedule.from_dict(d)
