"""Progressive distillation, Algorithm 2 of Salimans & Ho (2022).

Each round trains an N-step student, initialised from the 2N-step teacher, to match two
teacher DDIM steps with one of its own. Targets are formed in float64 under no_grad.

Under torchrun (WORLD_SIZE > 1) every rank draws the round's whole batch from one generator
seeded by (seed, round, iteration) and keeps its slice; DistributedDataParallel averages the
gradients, so K processes train the same student as one (up to float summation order), and a
run resumes after its last finished round at any world size.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .bundle import (
    MANIFEST,
    Bundle,
    BundleError,
    add_student,
    append_config,
    create_bundle,
    read_manifest,
    refuse_existing_bundle,
    update_manifest,
)
from .data import ImageDataset, load_dataset
from .denoiser import Denoiser
from .graceful_stop import Stopped, stop_requested
from .losses import WeightedXLoss
from .progress import progress as progress_bar
from .round_checkpoint import RoundCheckpoint, partial_round_file, round_settings
from .sampling import ddim_sample, noise_for_seeds
from .train import dist_info, init_distributed_from_env, load_run, training_device


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
    # Per-round peak learning rates, keyed like round_iters: early rounds start within a
    # fraction of a pixel level of their teacher and need a gentler rate than the last ones.
    round_lr: dict[int, float] = field(default_factory=dict)
    # Labels replaced by "no label" (index K), as in teacher training, so the students keep
    # the unconditional path that /generate serves when no label is given.
    label_dropout: float = 0.1
    data: str | None = None
    name: str | None = None
    seed: int = 0
    teacher_max_steps: int = 1024
    # Fixed seeds of the per-round gap to the teacher's 2N-step samples (logged, kept in the
    # manifest). On two reference MNIST 32 -> 16 rounds 16 seeds read 0.42 and 0.65 where 256
    # read 0.51 for both: too few to compare recipes. 64 seeds cost 33 s per probe of a
    # 64 -> 32 round on one CPU thread (two probes a round, halving each round): about 3% of
    # the reference recipe's time.
    probe_size: int = 64
    # Iterations between saves of a round's state (student, Adam, losses): an interrupted
    # round continues from the last save on --resume. A save of the 1.05 M reference network
    # takes well under a second against about 0.4 s per iteration.
    checkpoint_every: int = 250

    def __post_init__(self) -> None:
        rounds = math.log2(self.from_steps / self.to_steps) if self.to_steps > 0 else -1
        if self.to_steps < 1 or rounds < 1 or rounds != int(rounds):
            raise ValueError(
                f"--from-steps ({self.from_steps}) must be --to-steps ({self.to_steps}) times a "
                "power of two, with to-steps >= 1"
            )
        if self.iters_per_round < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError("iters-per-round and batch-size must be >= 1 and lr > 0")
        self.round_iters = self._per_round("--round-iters", self.round_iters, int)
        if any(k < 1 for k in self.round_iters.values()):
            raise ValueError("--round-iters: every round needs >= 1 iteration")
        self.round_lr = self._per_round("--round-lr", self.round_lr, float)
        if any(not v > 0 for v in self.round_lr.values()):
            raise ValueError("--round-lr: every learning rate must be > 0")
        if self.checkpoint_every < 1:
            raise ValueError(f"--checkpoint-every must be >= 1, got {self.checkpoint_every}")
        if self.probe_size < 1:
            raise ValueError(f"--probe-seeds must be >= 1, got {self.probe_size}")
        if not 0.0 <= self.label_dropout < 1.0:
            raise ValueError(f"--label-dropout must be in [0, 1), got {self.label_dropout}")

    def _per_round(self, flag: str, values: dict, cast) -> dict:
        """Per-round settings keyed by student steps, each naming a round this run makes."""
        values = {int(n): cast(v) for n, v in values.items()}
        unknown = sorted(set(values) - set(self.round_steps()))
        if unknown:
            raise ValueError(
                f"{flag} names student steps {unknown}, but this run's rounds make "
                f"students with {self.round_steps()} steps"
            )
        return values

    def iters_for(self, n_student: int) -> int:
        """Iterations of the round that makes the n_student-step student."""
        return self.round_iters.get(n_student, self.iters_per_round)

    def lr_for(self, n_student: int) -> float:
        """Peak learning rate of the round that makes the n_student-step student."""
        return self.round_lr.get(n_student, self.lr)

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
    """Algorithm 2 loss: t = i/N, z_t = alpha_t x + sigma_t eps, w(lambda_t)||x_tgt - x_hat||^2.

    `student` may be wrapped in DistributedDataParallel; it shares the teacher's schedule."""
    sched = teacher.schedule
    t = i.double() / n_student
    alpha, sigma = sched.alpha_sigma(t)
    z_t = alpha.view(-1, 1, 1, 1) * x.double() + sigma.view(-1, 1, 1, 1) * eps.double()
    x_tgt = distillation_target(teacher, z_t, t, labels, n_student)
    x_hat = student(z_t.float(), t.float(), labels)
    return loss_fn(x_tgt.float(), x_hat, sched.log_snr(t.float()))


def disable_dropout(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


@torch.no_grad()
def probe_gap(student: Denoiser, teacher: Denoiser, n_student: int, size: int) -> float:
    """Mean |student N-step sample - teacher 2N-step sample| in [0, 255] pixel units."""
    cfg = student.config
    device = next(student.parameters()).device
    noise = noise_for_seeds(list(range(size)), cfg.image_shape).to(device)
    labels = (torch.arange(size) % max(1, cfg.num_labels)).to(device)
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
    checkpoint: RoundCheckpoint | None = None,
) -> tuple[Denoiser, dict]:
    """Train an N-step student from a 2N-step teacher; returns it and the round's metrics.

    With `checkpoint`, the round continues from its saved state and saves it every
    `checkpoint.every` iterations."""
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must divide evenly over {world} processes")
    device = next(teacher.parameters()).device
    student = copy.deepcopy(teacher).requires_grad_(True)
    disable_dropout(student)
    teacher.eval().requires_grad_(False)
    net = student
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            student, device_ids=[device.index] if device.type == "cuda" else None
        )
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr_for(n_student))  # fresh every round
    saved = checkpoint.load() if checkpoint else None
    if saved:
        student.load_state_dict(saved["student"])
        opt.load_state_dict(saved["optimizer"])
        first, losses, wall_before = saved["next_iter"], saved["losses"], saved["wall_s"]
        gap_start = saved["gap_start"]
        if rank == 0:
            print(f"round {2 * n_student}->{n_student}: continuing at iteration {first} from "
                  f"{checkpoint.path}", flush=True)
    else:
        first, losses, wall_before = 0, [], 0.0
        gap_start = probe_gap(student, teacher, n_student, cfg.probe_size)
    started = time.perf_counter()
    K, peak_lr = cfg.iters_for(n_student), cfg.lr_for(n_student)
    part = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)
    bar = progress_bar(range(first, K), total=K, initial=first,
                       desc=f"{2 * n_student}->{n_student} steps",
                       disable=not progress or rank != 0)
    for k in bar:
        # The whole global batch from one generator, identical on every rank; each keeps its part.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + n_student * 100_003 + k)
        idx = torch.randint(len(dataset), (cfg.batch_size,), generator=g)
        x, labels = dataset.batch(idx)
        drop = torch.rand(cfg.batch_size, generator=g) < cfg.label_dropout
        labels = torch.where(drop, teacher.config.num_labels, labels)
        eps = torch.randn(x.shape, generator=g)
        i = torch.randint(1, n_student + 1, (cfg.batch_size,), generator=g)
        for group in opt.param_groups:  # linear anneal to 0 over the round
            group["lr"] = peak_lr * (1.0 - k / K)
        student.train()
        x, eps, labels, i = (v[part].to(device) for v in (x, eps, labels, i))
        loss = distillation_loss(net, teacher, loss_fn, x, eps, labels, i, n_student)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(_global_mean(loss.detach(), world))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
        stop = k + 1 < K and stop_requested(device)
        if checkpoint and (checkpoint.due(k + 1, K) or (stop and checkpoint.write)):
            wall = wall_before + time.perf_counter() - started
            checkpoint.save(student, opt, k + 1, losses, wall, gap_start)
        if stop:
            bar.close()
            where = f"saved in {checkpoint.path}" if checkpoint else "not saved"
            raise Stopped(f"stopped by SIGTERM after iteration {k + 1} of round "
                          f"{2 * n_student}->{n_student}, {where}; run the same command with "
                          "--resume to continue from there")
    student.eval().requires_grad_(False)
    wall = wall_before + time.perf_counter() - started
    metrics = {
        "loss_last_50": sum(losses[-50:]) / len(losses[-50:]),
        "wall_s": round(wall, 2),  # running time, summed over the pieces of a continued round
        "s_per_iter": round(wall / K, 4),
        "gap_to_teacher_start": round(gap_start, 3),
        "gap_to_teacher_end": round(probe_gap(student, teacher, n_student, cfg.probe_size), 3),
        "lr": peak_lr,
        "processes": world,
    }
    if saved:
        metrics["continued_at_iter"] = first
    return student, metrics


def distill_run(cfg: DistillConfig, resume: bool = False, progress: bool = True) -> Path:
    """Teacher run -> bundle with one student per round; each written as its round ends.

    Under torchrun rank 0 writes the bundle and the others wait for each write."""
    init_distributed_from_env()
    rank, _ = dist_info()
    device = training_device()
    train_cfg, teacher = load_run(cfg.teacher)
    dataset = load_dataset(cfg.data or train_cfg.data)
    if dataset.image_shape != teacher.config.image_shape:
        raise ValueError(
            f"data shape {dataset.image_shape} != teacher shape {teacher.config.image_shape}"
        )
    out = Path(cfg.out)
    if not resume:
        refuse_existing_bundle(out, "pass --resume or choose another --out")
    exists = (out / MANIFEST).is_file()
    _barrier()  # every rank has looked before rank 0 creates it
    if not exists and rank == 0:
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
    _barrier()
    bundle = Bundle(out) if exists else None  # verified once
    done = bundle.student_steps if bundle else []
    todo = rounds_to_make(cfg, done)
    if done:
        teacher = bundle.denoiser("student", min(done))
    if exists and rank == 0:
        print(f"resuming {out}: students {done} already distilled; rounds left: "
              f"{', '.join(f'{2 * n}->{n}' for n in todo) or 'none'}")
    teacher = teacher.to(device)
    loss_fn = WeightedXLoss(train_cfg.weighting)
    made_by = "distill"  # the key under the manifest's configs of the settings of this run
    if exists and rank == 0 and todo:
        made_by = _record_resumed_config(out, cfg)
    for n in todo:
        checkpoint = RoundCheckpoint(out / partial_round_file(n),
                                     round_settings(cfg, n, _teacher_sha256(out, 2 * n)),
                                     cfg.checkpoint_every, write=rank == 0)
        student, metrics = distill_round(teacher, dataset, n, cfg, loss_fn, progress, checkpoint)
        if rank == 0:
            add_student(
                out,
                n,
                {k: v.cpu() for k, v in student.unet.state_dict().items()},
                {
                    "distilled_from": 2 * n,
                    "iters": cfg.iters_for(n),
                    "config": made_by,
                    "metrics": metrics,
                },
            )
            print(
                f"round {2 * n}->{n}: loss {metrics['loss_last_50']:.5f}, lr {metrics['lr']:g}, "
                f"{metrics['wall_s']} s, gap to teacher {metrics['gap_to_teacher_start']} -> "
                f"{metrics['gap_to_teacher_end']} (mean |pixel diff|, 0..255)",
                flush=True,
            )
        checkpoint.remove()  # the student is in the bundle: the partial state is spent
        _barrier()
        teacher = student
    read_manifest(out)  # the finished manifest parses
    if rank == 0:
        print(f"bundle written to {out}", flush=True)
    return out


def rounds_to_make(cfg: DistillConfig, done: list[int]) -> list[int]:
    """The rounds a run still makes: after its smallest finished student, whose weights teach
    the next round. Students above it that a bundle lacks (`copy-bundle --students` dropped
    them) are not re-made; a chain that does not continue from it is refused."""
    if not done:
        return cfg.round_steps()
    last = min(done)
    todo = [n for n in cfg.round_steps() if n < last]
    if todo and todo[0] != last // 2:
        raise BundleError(
            f"the bundle's fewest-step student has {last} steps, so the next round makes "
            f"{last // 2}, but --from-steps {cfg.from_steps} --to-steps {cfg.to_steps} would "
            f"make {todo[0]} next; pass --from-steps {last}"
        )
    return todo


def _teacher_sha256(out: Path, teacher_steps: int) -> str:
    """The sha256 of the network a round copies: the student with `teacher_steps` steps, or
    the bundle's teacher for the first round."""
    bundle = Bundle(out, verify=False)  # the manifest only; the weights were verified at start
    if teacher_steps in bundle.student_steps:
        return bundle.weights_sha256("student", teacher_steps)
    return bundle.weights_sha256("teacher")


def _record_resumed_config(out: Path, cfg: DistillConfig) -> str:
    """Keep a resumed run's settings beside the creating run's (`configs.distill`), which they
    may differ from (longer rounds, another batch size or rate), and return the key its
    students record as `config`: "distill_resumes[i]"."""
    return update_manifest(out, lambda m: append_config(m, "distill_resumes", asdict(cfg)))


def _global_mean(value: torch.Tensor, world: int) -> float:
    """The loss over the whole global batch (each rank holds the mean of its slice)."""
    if world > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= world
    return value.item()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
