"""Teacher training: Adam, warmup, gradient clipping, EMA, checkpoints and resume, DDP.

Every rank draws the whole global batch (indices, t, eps, label dropout) from one generator
seeded by (seed, step) and keeps its slice, so a K-process run matches a 1-process run on the
same data and a resumed run continues the same stream.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from .data import ImageDataset, load_dataset
from .denoiser import Denoiser, ModelConfig, parameter_count
from .graceful_stop import Stopped, stop_requested
from .images import grid_png
from .io import atomic_save_safetensors, atomic_torch_save, atomic_write_bytes, atomic_write_json
from .losses import WeightedXLoss
from .presets import get_preset
from .progress import progress as progress_bar
from .run_folder import (
    CHECKPOINT,
    CONFIG,
    EMA_WEIGHTS,
    LOSS_LOG,
    check_same_model,
    discard_after,
    refuse_foreign_folder,
)
from .sampling import ddim_sample, noise_for_seeds


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "tiny"
    model: ModelConfig = field(default_factory=ModelConfig)
    max_steps: int = 50
    batch_size: int = 32
    lr: float = 2e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    label_dropout: float = 0.1
    weighting: str = "snr_trunc"
    checkpoint_every: int = 250
    seed: int = 0
    sample_steps: int = 64
    snapshot_every: int = 0  # keep ema-STEP.safetensors every N steps (a quality curve); 0 = off
    log_every: int = 50  # append the mean loss of the last N steps to loss.jsonl

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_preset(cls, preset: str, data: str, out: str, image_shape, num_labels, **overrides):
        p = get_preset(preset)
        channels, size, _ = image_shape
        model = ModelConfig(image_size=size, channels=channels, num_labels=num_labels, **p["model"])
        kwargs = {**p["train"], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(data=data, out=out, preset=preset, model=model, **kwargs)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed_from_env() -> bool:
    """Join a torchrun group when WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA, one GPU per
    process chosen by LOCAL_RANK)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return False
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def training_device() -> torch.device:
    """This process's GPU under torchrun (or the only one), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def draw_global_batch(cfg: TrainConfig, step: int, dataset: ImageDataset):
    """The step's whole batch from one generator: identical on every rank."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    b = cfg.batch_size
    idx = torch.randint(len(dataset), (b,), generator=g)
    t = torch.rand(b, generator=g)
    eps = torch.randn((b, *dataset.image_shape), generator=g)
    drop = torch.rand(b, generator=g) < cfg.label_dropout
    return idx, t, eps, drop


def training_loss(model, loss_fn, schedule, x, labels, t, eps):
    """z_t = alpha x + sigma eps; loss = w(lambda_t) ||x - x_hat(z_t, t)||^2."""
    alpha, sigma = schedule.alpha_sigma(t)
    z = alpha.view(-1, 1, 1, 1) * x + sigma.view(-1, 1, 1, 1) * eps
    return loss_fn(x, model(z, t, labels), schedule.log_snr(t))


def lr_at(cfg: TrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


def ema_decay_at(cfg: TrainConfig, step: int) -> float:
    """Warm the EMA up: min(decay, (1 + s) / (10 + s)), so the random initial weights fade out
    within the first few hundred steps instead of weighing decay^s (0.9995^1000 = 0.6)."""
    return min(cfg.ema_decay, (1.0 + step) / (10.0 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        p_ema.lerp_(p.detach(), 1.0 - decay)


def sample_grid(denoiser: Denoiser, steps: int, n: int = 16) -> bytes:
    cfg = denoiser.config
    labels = torch.arange(n) % max(1, cfg.num_labels)
    noise = noise_for_seeds(list(range(n)), cfg.image_shape)
    return grid_png(ddim_sample(denoiser.eval(), noise, labels, steps, denoiser.schedule))


def load_run(run_dir: str | os.PathLike) -> tuple[TrainConfig, Denoiser]:
    """A finished (or checkpointed) run's config and its EMA teacher."""
    run_dir = Path(run_dir)
    for name in (CONFIG, EMA_WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} not found: is {run_dir} a training run?")
    raw = json.loads((run_dir / CONFIG).read_text())
    cfg = TrainConfig(**{**raw, "model": ModelConfig.from_dict(raw["model"])})
    teacher = Denoiser(cfg.model)
    teacher.unet.load_state_dict(load_file(run_dir / EMA_WEIGHTS))
    return cfg, teacher.eval()


def train(
    cfg: TrainConfig, resume: bool = False, progress: bool = True, reset_ema: bool = False
) -> Path:
    """Train a teacher; returns the run directory (config.json, ema.safetensors, checkpoint)."""
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    rank, world = dist_info()
    if cfg.batch_size % world:
        raise ValueError(f"batch size {cfg.batch_size} must divide evenly over {world} processes")
    device = training_device()
    dataset = load_dataset(cfg.data)
    if dataset.image_shape != cfg.model.image_shape:
        raise ValueError(f"data shape {dataset.image_shape} != model shape {cfg.model.image_shape}")
    out = Path(cfg.out)
    model = Denoiser(cfg.model).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    step = 0
    if resume and (out / CHECKPOINT).is_file():
        check_same_model(out, cfg.model.to_dict())
        state = torch.load(out / CHECKPOINT, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        step = int(state["step"])
        if reset_ema:  # restart the average from the current weights
            ema.load_state_dict(model.state_dict())
    elif resume:
        refuse_foreign_folder(out)
        check_same_model(out, cfg.model.to_dict())
        if rank == 0:
            print(f"--resume: no checkpoint in {out} yet: starting at step 0")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            discard_after(out, step)
        atomic_write_json(out / CONFIG, cfg.to_dict())
        print(
            f"training {parameter_count(model) / 1e6:.2f} M parameters on {dataset.name} "
            f"({len(dataset)} images), {world} process(es), device {device}, from step {step}"
        )
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    loss_fn = WeightedXLoss(cfg.weighting)
    per_rank = cfg.batch_size // world
    bar = progress_bar(
        total=cfg.max_steps, initial=step, desc="train", disable=not progress or rank != 0
    )
    started, start_step = time.perf_counter(), step
    loss_sum, loss_count = 0.0, 0
    while step < cfg.max_steps:
        idx, t, eps, drop = draw_global_batch(cfg, step, dataset)
        part = slice(rank * per_rank, (rank + 1) * per_rank)
        x, labels = dataset.batch(idx[part])
        labels = torch.where(drop[part], cfg.model.num_labels, labels)
        model.train()
        loss = training_loss(
            net,
            loss_fn,
            model.schedule,
            x.to(device),
            labels.to(device),
            t[part].to(device),
            eps[part].to(device),
        )
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        update_ema(ema, model, ema_decay_at(cfg, step))
        step += 1
        rate = (step - start_step) / (time.perf_counter() - started)
        loss_sum, loss_count = loss_sum + loss.item(), loss_count + 1
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}", steps_per_s=f"{rate:.2f}")
        if rank == 0 and cfg.log_every and step % cfg.log_every == 0:
            _append_loss(out, step, loss_sum / loss_count, rate)
            loss_sum, loss_count = 0.0, 0
        if rank == 0 and cfg.snapshot_every and step % cfg.snapshot_every == 0:
            atomic_save_safetensors(ema.unet.state_dict(), out / f"ema-{step:06d}.safetensors")
        saved = step % cfg.checkpoint_every == 0 or step == cfg.max_steps
        if rank == 0 and saved:
            save_checkpoint(out, model, ema, opt, step, cfg)
        if step < cfg.max_steps and stop_requested(device):
            if rank == 0 and not saved:
                save_checkpoint(out, model, ema, opt, step, cfg)
            bar.close()
            raise Stopped(f"stopped by SIGTERM after step {step}, saved in {out / CHECKPOINT}; "
                          "run the same command with --resume to continue from there")
    bar.close()
    return out


def _append_loss(out: Path, step: int, mean_loss: float, steps_per_s: float) -> None:
    with open(out / LOSS_LOG, "a") as f:
        f.write(json.dumps({"step": step, "loss": mean_loss, "steps_per_s": steps_per_s}) + "\n")


def save_checkpoint(out: Path, model, ema, opt, step: int, cfg: TrainConfig) -> None:
    """EMA weights first (the teacher), then the resumable state, then a sample grid."""
    atomic_save_safetensors(ema.unet.state_dict(), out / EMA_WEIGHTS)
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
        },
        out / CHECKPOINT,
    )
    atomic_write_bytes(
        out / f"samples-{step:06d}.png", sample_grid(ema.to("cpu"), min(cfg.sample_steps, 64))
    )
    ema.to(next(model.parameters()).device)
