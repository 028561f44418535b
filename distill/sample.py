"""`halfstep sample`: images from a bundle, by seed, into a PNG grid."""

from __future__ import annotations

from pathlib import Path

import torch

from .bundle import Bundle, BundleError
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


def resolve_steps(bundle: Bundle, model: str, steps: int | None, exact: bool = False) -> int:
    """The step count that runs, by the HTTP API's rule. Student: `steps` is a budget, the
    largest student <= steps runs (with `exact`, only a student of exactly `steps`); no steps
    means the largest student. Teacher: exact, 1..max; no steps means its default."""
    if model == "student":
        if not bundle.student_steps:
            raise BundleError(f"bundle {bundle.name} has no students; use the teacher")
        if steps is None:
            return bundle.student_steps[-1]
        if exact:
            if steps not in bundle.student_steps:
                students = ", ".join(map(str, bundle.student_steps))
                raise BundleError(f"exact: no student has steps={steps}; students: {students} "
                                  "(without exact, steps is a budget)")
            return steps
        return bundle.student_for_budget(steps)
    steps = bundle.teacher_default_steps if steps is None and model == "teacher" else steps
    bundle.check_steps(model, steps)
    return steps


def sample_images(bundle: Bundle, steps: int, n: int = 16, seed: int = 0, label: int | None = None,
                  model: str = "student", sampler: str = "ddim", engine=None):
    """[n, C, H, W] images in [-1, 1]; the same arguments always give the same images.

    `engine` is any object with `run(model, steps, noise, labels)` (an Engine); without one the
    eager reference sampler runs in process. `steps` is exact here; `resolve_steps` turns a
    budget into a step count first."""
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
