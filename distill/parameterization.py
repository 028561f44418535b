"""Network output -> x_hat for each parameterization: v, x, eps, or both (x and eps mixed)."""

from __future__ import annotations

import torch

PARAMETERIZATIONS = ("v", "x", "eps", "both")


def output_channels(parameterization: str, image_channels: int) -> int:
    """`both` predicts two channel groups (x~, eps~); the others one."""
    check_parameterization(parameterization)
    return 2 * image_channels if parameterization == "both" else image_channels


def check_parameterization(parameterization: str) -> None:
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(
            f"unknown parameterization {parameterization!r}; choose one of {PARAMETERIZATIONS}"
        )


def x_hat_from_output(
    parameterization: str, out: torch.Tensor, z: torch.Tensor, alpha, sigma
) -> torch.Tensor:
    """Convert the network output to x_hat. alpha/sigma broadcast against z ([B,1,1,1])."""
    if parameterization == "v":  # v = alpha eps - sigma x  =>  x = alpha z - sigma v
        return alpha * z - sigma * out
    if parameterization == "x":
        return out
    if parameterization == "eps":  # explodes as alpha -> 0; kept for completeness
        return (z - sigma * out) / alpha
    if parameterization == "both":  # sigma^2 x~ + alpha (z - sigma eps~)
        x_tilde, eps_tilde = out.chunk(2, dim=1)
        return sigma**2 * x_tilde + alpha * (z - sigma * eps_tilde)
    check_parameterization(parameterization)
    raise AssertionError("unreachable")


def eps_from_x_hat(z: torch.Tensor, x_hat: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """eps_hat = (z - alpha x_hat) / sigma."""
    return (z - alpha * x_hat) / sigma


def v_from_x_eps(x: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """v = alpha eps - sigma x."""
    return alpha * eps - sigma * x
