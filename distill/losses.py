"""Loss weightings, all written as w(lambda) * ||x - x_hat||^2, with lambda the log-SNR.

eps-MSE = SNR x-MSE and v-MSE = (SNR + 1) x-MSE, so each weighting is a weight on x-MSE.
"""

from __future__ import annotations

import torch

WEIGHTINGS = ("snr_trunc", "snr_plus_one", "snr")


class WeightedXLoss:
    """Per-example w(lambda) * mean((x - x_hat)^2), averaged over the batch."""

    def __init__(self, weighting: str = "snr_trunc") -> None:
        if weighting not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {WEIGHTINGS}")
        self.weighting = weighting

    def weight(self, log_snr: torch.Tensor) -> torch.Tensor:
        snr = torch.exp(log_snr)
        if self.weighting == "snr_trunc":  # max(x-MSE, eps-MSE) = max(SNR, 1) x-MSE
            return torch.clamp(snr, min=1.0)
        if self.weighting == "snr_plus_one":  # = v-MSE
            return snr + 1.0
        return snr  # plain eps-MSE; weight 0 at t = 1

    def __call__(self, x: torch.Tensor, x_hat: torch.Tensor, log_snr: torch.Tensor) -> torch.Tensor:
        per_example = (x - x_hat).pow(2).flatten(1).mean(dim=1)
        return (self.weight(log_snr).to(per_example.dtype) * per_example).mean()
