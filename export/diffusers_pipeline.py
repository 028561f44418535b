"""HalfstepPipeline: a halfstep student's exact N-step DDIM sampler as a diffusers pipeline.

`halfstep export --format diffusers` copies this file, unchanged, into each exported folder as
`pipeline.py`, next to `unet/` and `model_index.json`; it imports only torch and diffusers, so
the folder loads without halfstep:

    pipe = DiffusionPipeline.from_pretrained(folder, custom_pipeline=f"{folder}/pipeline.py",
                                             trust_remote_code=True)
    images = pipe(batch_size=4, class_labels=[0, 1, 0, 1], generator=g).images

The sampler constants live in the pipeline's config (model_index.json): the student's step
count, the parameterization (v, eps, x or both), the UNet's time scale (its timestep input is
time_scale * t for t in [0, 1]) and the schedule, cosine with clipped log-SNR or a discrete
log-SNR table interpolated linearly in the step index. Sampling runs on t_i = i/N: x_hat is
clipped to [-1, 1] at every step and the last step returns x_hat.
"""

from __future__ import annotations

import math

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel


class HalfstepPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: UNet2DModel, steps: int = 1, parameterization: str = "v",
                 time_scale: float = 1000.0, num_labels: int = 0,
                 schedule: dict | None = None) -> None:
        super().__init__()
        if parameterization not in ("v", "eps", "x", "both"):
            raise ValueError(f"unsupported parameterization {parameterization!r}")
        self.register_modules(unet=unet)
        self.register_to_config(steps=int(steps), parameterization=parameterization,
                                time_scale=float(time_scale), num_labels=int(num_labels),
                                schedule=schedule or {"name": "cosine", "logsnr_min": -20.0,
                                                      "logsnr_max": 20.0})

    # -- schedule: lambda_t, alpha_t, sigma_t in the dtype of t ----------------------------
    def log_snr(self, t: torch.Tensor) -> torch.Tensor:
        sched = self.config.schedule
        if sched["name"] == "cosine":
            b = math.atan(math.exp(-0.5 * sched["logsnr_max"]))
            a = math.atan(math.exp(-0.5 * sched["logsnr_min"])) - b
            return -2.0 * torch.log(torch.tan(a * t + b))
        if sched["name"] != "discrete":
            raise ValueError(f"unknown schedule {sched['name']!r}")
        table = torch.tensor(sched["log_snr"], dtype=torch.float64, device=t.device)
        k = t.to(torch.float64).clamp(0.0, 1.0) * (len(table) - 1)
        lo = k.floor().long().clamp(max=len(table) - 2)
        frac = k - lo
        return (table[lo] * (1 - frac) + table[lo + 1] * frac).to(t.dtype)

    def alpha_sigma(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam = self.log_snr(t)
        return torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()

    def alpha_sigma_float(self, t: float) -> tuple[float, float]:
        alpha, sigma = self.alpha_sigma(torch.tensor(t, dtype=torch.float64))
        return float(alpha), float(sigma)

    # -- the network as x_hat = denoise(z, t, labels) ---------------------------------------
    def denoise(self, z: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None,
                ) -> torch.Tensor:
        a, s = self.alpha_sigma(t)
        alpha, sigma = a.view(-1, 1, 1, 1).to(z.dtype), s.view(-1, 1, 1, 1).to(z.dtype)
        out = self.unet(z, self.config.time_scale * t.to(z.dtype), class_labels=labels).sample
        kind = self.config.parameterization
        if kind == "v":
            return alpha * z - sigma * out
        if kind == "eps":
            return (z - sigma * out) / alpha
        if kind == "both":  # x~ and eps~ mixed: sigma^2 x~ + alpha (z - sigma eps~)
            x_tilde, eps_tilde = out.chunk(2, dim=1)
            return sigma**2 * x_tilde + alpha * (z - sigma * eps_tilde)
        return out

    def _labels(self, class_labels, batch: int, device: torch.device) -> torch.Tensor | None:
        k = self.config.num_labels
        if not k:
            if class_labels is not None:
                raise ValueError("this model has no class labels")
            return None
        if class_labels is None:
            return torch.full((batch,), k, dtype=torch.long, device=device)  # K = no label
        labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(device)
        if labels.numel() == 1:
            labels = labels.expand(batch)
        if labels.numel() != batch or bool(((labels < 0) | (labels > k)).any()):
            raise ValueError(f"class_labels must be {batch} ints in 0..{k} ({k} = no label)")
        return labels

    @torch.no_grad()
    def __call__(self, noise: torch.Tensor | None = None, class_labels=None, batch_size: int = 1,
                 generator: torch.Generator | None = None, num_inference_steps: int | None = None,
                 output_type: str = "pil", return_dict: bool = True):
        """Images from `noise` [B, C, H, W] (or noise drawn with `generator`), labels 0..K-1
        (K or None = unconditional). output_type: "pil", "np" ([0, 1] NHWC), "pt" ([0, 1]
        NCHW) or "raw" (the sampler's [-1, 1] NCHW tensor)."""
        cfg = self.unet.config
        if noise is None:
            shape = (batch_size, cfg.in_channels, cfg.sample_size, cfg.sample_size)
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        z = noise.to(device=self.device, dtype=self.unet.dtype)
        labels = self._labels(class_labels, z.shape[0], z.device)
        steps = int(num_inference_steps or self.config.steps)
        grid = [i / steps for i in range(steps, -1, -1)]
        x_hat = z
        for t, s in zip(grid[:-1], grid[1:]):
            t_vec = torch.full((z.shape[0],), t, dtype=torch.float32, device=z.device)
            x_hat = self.denoise(z, t_vec, labels).clamp(-1.0, 1.0)
            if s > 0:
                alpha_t, sigma_t = self.alpha_sigma_float(t)
                alpha_s, sigma_s = self.alpha_sigma_float(s)
                z = alpha_s * x_hat + sigma_s * ((z - alpha_t * x_hat) / sigma_t)
        if output_type == "raw":
            images = x_hat
        else:
            images = (x_hat / 2 + 0.5).clamp(0, 1)
            if output_type != "pt":
                images = images.cpu().permute(0, 2, 3, 1).float().numpy()
                if output_type == "pil":
                    images = self.numpy_to_pil(images)
        return ImagePipelineOutput(images=images) if return_dict else (images,)
