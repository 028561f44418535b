"""The one Denoiser interface: x_hat = denoiser(z, t, label), wrapping a diffusers UNet2DModel.

Teacher and students are both Denoisers; samplers and losses see nothing else, so the
parameterization and time input are decided here and nowhere else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from diffusers import UNet2DModel
from torch import nn

from .parameterization import check_parameterization, output_channels, x_hat_from_output
from .schedule import CosineSchedule, DiscreteSchedule, schedule_from_dict

# The time input the UNet sees: its sinusoidal embedding of 1000 * t for t in [0, 1], the
# scale of the official progressive distillation code.
TIME_INPUT = "1000t"
# Imported diffusers models see their own timestep index: (T - 1) * t, with T the discrete
# schedule's num_train_timesteps, so t = k / (T - 1) feeds exactly the step k they trained on.
DISCRETE_TIME_INPUT = "(T-1)t"


@dataclass
class ModelConfig:
    """Everything needed to rebuild the network; stored in every checkpoint and bundle."""

    image_size: int = 28
    channels: int = 1
    num_labels: int = 10  # K real labels; index K means "no label" (unconditional)
    parameterization: str = "v"
    block_out_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    dropout: float = 0.0
    schedule: dict = field(default_factory=lambda: CosineSchedule().to_dict())
    time_input: str = TIME_INPUT
    # A diffusers UNet2DModel config, for imported models whose layout build_unet's own
    # recipe does not describe; None for models trained here (and then left out of to_dict).
    unet: dict | None = None

    def __post_init__(self) -> None:
        check_parameterization(self.parameterization)
        self.block_out_channels = tuple(int(c) for c in self.block_out_channels)
        expected = DISCRETE_TIME_INPUT if self.schedule.get("name") == "discrete" else TIME_INPUT
        if self.time_input != expected:
            raise ValueError(f"unsupported time_input {self.time_input!r} for a "
                             f"{self.schedule.get('name', 'cosine')} schedule; expected {expected}")
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(
                f"every block width {self.block_out_channels} must be divisible by "
                f"norm_num_groups={self.norm_num_groups}"
            )
        if self.num_labels < 0:
            raise ValueError("num_labels must be >= 0")
        if self.channels < 1 or self.image_size < 1:
            raise ValueError(f"image shape {self.image_shape} must be positive")
        factor = 2 ** (len(self.block_out_channels) - 1)  # the UNet halves the size per level
        if self.image_size % factor:
            raise ValueError(
                f"image size {self.image_size} must be divisible by {factor} for "
                f"{len(self.block_out_channels)} UNet levels; pick another --image-size or preset"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.channels, self.image_size, self.image_size)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["block_out_channels"] = list(self.block_out_channels)
        if d["unet"] is None:
            del d["unet"]
        return d

    @property
    def time_scale(self) -> float:
        """The factor from t in [0, 1] to the UNet's timestep input."""
        if self.time_input == DISCRETE_TIME_INPUT:
            return float(DiscreteSchedule.from_dict(self.schedule).num_train_timesteps - 1)
        return 1000.0

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def build_unet(config: ModelConfig) -> UNet2DModel:
    if config.unet is not None:
        return UNet2DModel.from_config(config.unet)
    depth = len(config.block_out_channels)
    return UNet2DModel(
        sample_size=config.image_size,
        in_channels=config.channels,
        out_channels=output_channels(config.parameterization, config.channels),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        down_block_types=("DownBlock2D",) * depth,
        up_block_types=("UpBlock2D",) * depth,
        add_attention=False,
        norm_num_groups=config.norm_num_groups,
        dropout=config.dropout,
        num_class_embeds=config.num_labels + 1 if config.num_labels else None,
    )


class Denoiser(nn.Module):
    """x_hat = denoiser(z, t, labels) for any parameterization (cf. edm EDMPrecond)."""

    def __init__(self, config: ModelConfig, unet: UNet2DModel | None = None) -> None:
        super().__init__()
        self.config = config
        self.schedule = schedule_from_dict(config.schedule)
        self.unet = unet if unet is not None else build_unet(config)

    @property
    def unconditional_label(self) -> int:
        return self.config.num_labels

    def forward(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None,
                alpha: float | None = None, sigma: float | None = None) -> torch.Tensor:
        """z: [B,C,H,W]; t: [B] or scalar in [0, 1]; labels: [B] int64, K = no label.

        `alpha`, `sigma`: alpha_t, sigma_t as Python floats, for callers that bake the time grid
        into constants computed in float64 (the ONNX sampler); by default they are computed
        from t in float32.
        """
        t = torch.as_tensor(t, dtype=torch.float32, device=z.device).expand(z.shape[0])
        if alpha is None or sigma is None:
            a, s = self.schedule.alpha_sigma(t)
            alpha, sigma = a.view(-1, 1, 1, 1).to(z.dtype), s.view(-1, 1, 1, 1).to(z.dtype)
        if self.config.num_labels:
            if labels is None:
                labels = torch.full((z.shape[0],), self.unconditional_label, device=z.device)
            class_labels = labels.to(device=z.device, dtype=torch.long)
        else:
            class_labels = None
        out = self.unet(z, self.config.time_scale * t.to(z.dtype), class_labels=class_labels).sample
        return x_hat_from_output(self.config.parameterization, out, z, alpha, sigma)


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
