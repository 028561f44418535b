"""Progressive distillation, Algorithm 2 of Salimans & Ho (docs/PAPER.md section 5).

Each round trains an N-step student, initialised from the 2N-step teacher, to match two
teacher DDIM steps with one of its own. Targets are formed in float64 under no_grad.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .bundle import Bundle, BundleError, add_student, create_bundle, read_manifest
from .data import ImageDataset, load_dataset
from .denoiser import Denoiser
from .losses import WeightedXLoss
from .sampling import ddim_sample, noise_for_seeds
from .train import load_run


@dataclass
class DistillConfig:
    teacher: str
    out: str
    from_steps: int = 256
    to_steps: int = 1
    iters_per_round: int = 300
    # Per-round overrides, keyed by the student's step count: {4: 500, 1: 1000}. The last
    # rounds are the hard ones (the gap to the teacher doubles each round), so a recipe
    # spends its iterations there.
    round_iters: dict[int, int] = field(default_factory=dict)
    batch_size: int = 64
    lr: float = 1e-4
    data: str | None = None
    name: str | None = None
    seed: int = 0
    teacher_max_steps: int = 1024
    probe_size: int = 16

    def __post_init__(self) -> None:
        rounds = math.log2(self.from_steps / self.to_steps) if self.to_steps > 0 else -1
        if self.to_steps < 1 or rounds < 1 or rounds != int(rounds):
            raise ValueError(
                f"--from-steps ({self.from_steps}) must be --to-steps ({self.to_steps}) times a "
                "power of two, with to-steps >= 1"
            )
        if self.iters_per_round < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("iters-per-round and batch-size must be >= 1 and lr > 0")
        self.round_iters = {int(n): int(k) for n, k in self.round_iters.items()}
        unknown = sorted(set(self.round_iters) - set(self.round_steps()))
        if unknown:
            raise ValueError(
                f"--round-iters names student steps {unknown}, but this run's rounds make "
                f"students with {self.round_steps()} steps"
            )
        if any(k < 1 for k in self.round_iters.values()):
            raise ValueError("--round-iters: every round needs >= 1 iteration")

    def iters_for(self, n_student: int) -> int:
        """Iterations of the round that makes the n_student-step student."""
        return self.round_iters.get(n_student, self.iters_per_round)

    def round_steps(self) -> list[int]:
        """Student step counts in order: from_steps/2, ..., to_steps."""
        steps, n = [], self.from_steps // 2
        while n >= self.to_steps:
            steps.append(n)
            n //= 2
        return steps


@torch.no_grad()
def distillation_target(
    teacher: Denoiser,
    z_t: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor | None,
    n_student: int,
) -> torch.Tensor:
    """x_tgt such that one student DDIM step t -> t'' lands on two teacher steps (float64).

    z_t and t are float64; the teacher runs in its own dtype, its x_hat is NOT clipped.
    """
    sched = teacher.schedule
    t1, t2 = t - 0.5 / n_student, t - 1.0 / n_student  # t' and t''
    (a_t, s_t), (a_1, s_1), (a_2, s_2) = (
        [v.view(-1, 1, 1, 1) for v in sched.alpha_sigma(tt)] for tt in (t, t1, t2)
    )
    dtype = next(teacher.parameters()).dtype
    xh = teacher(z_t.to(dtype), t.to(torch.float32), labels).double()
    z_1 = a_1 * xh + (s_1 / s_t) * (z_t - a_t * xh)
    xh_1 = teacher(z_1.to(dtype), t1.to(torch.float32), labels).double()
    z_2 = a_2 * xh_1 + (s_2 / s_1) * (z_1 - a_1 * xh_1)
    # Denominator uses sigma_t'' / sigma_t (a known pitfall: not sigma_t').
    x_tgt = (z_2 - (s_2 / s_t) * z_t) / (a_2 - (s_2 / s_t) * a_t)
    last = (t2 <= 0).view(-1, 1, 1, 1)
    return torch.where(last, xh_1, x_tgt)  # last step: the teacher's final x_hat


def distillation_loss(
    student: Denoiser,
    teacher: Denoiser,
    loss_fn: WeightedXLoss,
    x: torch.Tensor,
    eps: torch.Tensor,
    labels: torch.Tensor | None,
    i: torch.Tensor,
    n_student: int,
) -> torch.Tensor:
    """Algorithm 2 loss: t = i/N, z_t = alpha_t x + sigma_t eps, w(lambda_t)||x_tgt - x_hat||^2."""
    t = i.double() / n_student
    alpha, sigma = student.schedule.alpha_sigma(t)
    z_t = alpha.view(-1, 1, 1, 1) * x.double() + sigma.view(-1, 1, 1, 1) * eps.double()
    x_tgt = distillation_target(teacher, z_t, t, labels, n_student)
    x_hat = student(z_t.float(), t.float(), labels)
    return loss_fn(x_tgt.float(), x_hat, student.schedule.log_snr(t.float()))


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@torch.no_grad()
def probe_gap(student: Denoiser, teacher: Denoiser, n_student: int, size: int) -> float:
    """Mean |student N-step sample - teacher 2N-step sample| in [0, 255] pixel units."""
    cfg = student.config
    noise = noise_for_seeds(list(range(size)), cfg.image_shape)
    labels = torch.arange(size) % max(1, cfg.num_labels)
    a = ddim_sample(student.eval(), noise, labels, n_student, student.schedule)
    b = ddim_sample(teacher.eval(), noise, labels, 2 * n_student, teacher.schedule)
    return float((a - b).abs().mean() * 127.5)


def distill_round(
    teacher: Denoiser,
    dataset: ImageDataset,
    n_student: int,
    cfg: DistillConfig,
    loss_fn: WeightedXLoss,
    progress: bool = True,
) -> tuple[Denoiser, dict]:
    """Train an N-step student from a 2N-step teacher; returns it and the round's metrics."""
    student = copy.deepcopy(teacher).requires_grad_(True)
    disable_dropout(student)
    teacher.eval().requires_grad_(False)
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)  # fresh Adam every round
    gap_start = probe_gap(student, teacher, n_student, cfg.probe_size)
    started, losses = time.perf_counter(), []
    K = cfg.iters_for(n_student)
    bar = tqdm(
        range(K),
        desc=f"{2 * n_student}->{n_student} steps",
        disable=not progress,
        dynamic_ncols=True,
    )
    for k in bar:
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n_student * 100_003 + k)
        idx = torch.randint(len(dataset), (cfg.batch_size,), generator=g)
        x, labels = dataset.batch(idx)
        drop = torch.rand(cfg.batch_size, generator=g) < 0.1  # keep unconditional sampling
        labels = torch.where(drop, teacher.config.num_labels, labels)
        eps = torch.randn(x.shape, generator=g)
        i = torch.randint(1, n_student + 1, (cfg.batch_size,), generator=g)
        for group in opt.param_groups:  # linear anneal to 0 over the round
            group["lr"] = cfg.lr * (1.0 - k / K)
        student.train()
        loss = distillation_loss(student, teacher, loss_fn, x, eps, labels, i, n_student)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    student.eval().requires_grad_(False)
    metrics = {
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "wall_s": round(time.perf_counter() - started, 2),
        "s_per_iter": round((time.perf_counter() - started) / K, 4),
        "gap_to_teacher_start": round(gap_start, 3),
        "gap_to_teacher_end": round(probe_gap(student, teacher, n_student, cfg.probe_size), 3),
    }
    return student, metrics


def distill_run(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Teacher run -> bundle with one student per round; each written as its round ends."""
    train_cfg, teacher = load_run(cfg.teacher)
    dataset = load_dataset(cfg.data or train_cfg.data)
    out = Path(cfg.out)
    done: list[int] = []
    if resume and (out / "bundle.json").is_file():
        bundle = Bundle(out)
        done = bundle.student_steps
        if done:
            teacher = bundle.denoiser("student", min(done))
        print(f"resuming {out}: students {done} already distilled")
    elif (out / "bundle.json").is_file():
        raise BundleError(f"{out} already holds a bundle; pass --resume or choose another --out")
    else:
        configs = {"train": train_cfg.to_dict(), "distill": asdict(cfg)}
        create_bundle(
            out,
            cfg.name or out.name,
            teacher.config,
            teacher.unet.state_dict(),
            cfg.from_steps,
            cfg.teacher_max_steps,
            configs,
        )
    loss_fn = WeightedXLoss(train_cfg.weighting)
    for n in cfg.round_steps():
        if n in done:
            continue
        student, metrics = distill_round(teacher, dataset, n, cfg, loss_fn, progress)
        add_student(
            out,
            n,
            student.unet.state_dict(),
            {"distilled_from": 2 * n, "iters": cfg.iters_for(n), "metrics": metrics},
        )
        print(
            f"round {2 * n}->{n}: loss {metrics['loss_last_50']:.5f}, {metrics['wall_s']} s, "
            f"gap to teacher {metrics['gap_to_teacher_start']} -> "
            f"{metrics['gap_to_teacher_end']} (mean |pixel diff|, 0..255)",
            flush=True,
        )
        teacher = student
    read_manifest(out)  # the finished manifest parses
    return out
