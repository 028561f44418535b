"""Continuous-time cosine schedule with clipped log-SNR: alpha_t, sigma_t and lambda_t.

z_t = alpha_t x + sigma_t eps, alpha_t^2 = sigmoid(lambda_t), sigma_t^2 = sigmoid(-lambda_t).
Everything here runs in the dtype of its input: pass float32 or float64, never half.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class CosineSchedule:
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

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t) with alpha^2 + sigma^2 = 1."""
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def alpha_sigma_float(self, t: float) -> tuple[float, float]:
        """Python floats (float64) for samplers that bake the time grid into constants."""
        alpha, sigma = self.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return float(alpha), float(sigma)

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
