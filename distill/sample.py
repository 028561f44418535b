"""`halfstep sample`: images from a bundle, by seed, into a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import Bundle
from .images import grid_png
from .io import atomic_write_bytes
from .sampling import ancestral_sample, ddim_sample, noise_for_seeds


def request_seeds(seed: int, n: int) -> list[int]:
    """Image i of a request with seed s uses seed s + i: promised to users, never change it."""
    return [seed + i for i in range(n)]


def reference_images(bundle: Bundle, model: str, steps: int, noise: torch.Tensor,
                     labels: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Eager deterministic DDIM of the bundle's teacher or student: float32 CPU images in
    [-1, 1]. The eager engine runs this; compiled exports are checked against it."""
    den = bundle.denoiser(model, steps if model == "student" else None).to(device)
    images = ddim_sample(den, noise.to(device), labels.to(device), steps, den.schedule)
    return images.float().cpu()


def sample_images(bundle: Bundle, steps: int, n: int = 16, seed: int = 0, label: int | None = None,
                  model: str = "student", sampler: str = "ddim", engine=None):
    """[n, C, H, W] images in [-1, 1]; the same arguments always give the same images.

    `engine` is any object with `run(model, steps, noise, labels)` (an Engine); without one the
    eager reference sampler runs in process."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    bundle.check_steps(model, steps)
    k = bundle.num_labels
    if label is not None and not 0 <= label < k:
        raise ValueError(f"label must be in 0..{k - 1}, got {label}")
    labels = torch.full((n,), k if label is None else label, dtype=torch.int64)
    noise = noise_for_seeds(request_seeds(seed, n), bundle.image_shape)
    if sampler == "ancestral":
        if model != "teacher":
            raise ValueError("the ancestral sampler is for the teacher: pass --model teacher")
        den = bundle.denoiser("teacher")
        gen = torch.Generator().manual_seed(seed)
        return ancestral_sample(den, noise, labels, steps, den.schedule, generator=gen)
    if sampler != "ddim":
        raise ValueError(f"unknown sampler {sampler!r}; choose ddim or ancestral")
    if engine is None:
        return reference_images(bundle, model, steps, noise, labels)
    return engine.run(model, steps, noise, labels)


def write_grid(images: torch.Tensor, out: str | Path) -> Path:
    out = Path(out)
    atomic_write_bytes(out, grid_png(images))
    return out
