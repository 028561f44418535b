"""Eager PyTorch engine: the reference every other backend is checked against."""

from __future__ import annotations

import torch

from halfstep.distill.bundle import Bundle
from halfstep.distill.sample import reference_images
from halfstep.distill.sampling import ddim_steps

from .base import Engine, EngineError

# oneDNN runs batches of 1-3 images through other convolution kernels than larger batches, and
# their last-bit differences can flip a uint8 pixel of a request depending on its batch. Padding
# to 4 rows avoids those kernels (torch 2.13 on CPU, reference MNIST UNet, 4 steps:
# rows of batches 1-3 differ from the same rows in a batch of 64 by up to 1.7e-6; rows of
# batches 4 and 8 are bitwise equal). ONNX Runtime's CPU kernels gave bitwise-equal rows from
# batch 1 up, so OrtEngine keeps min_rows = 1 (padding it to 4 rows tripled its batch-1 time,
# 15 -> 45 ms at 4 steps).
CPU_MIN_ROWS = 4


class TorchEngine(Engine):
    """Eager PyTorch on CPU or GPU: the reference every other engine is checked against."""

    name = "torch"

    def __init__(
        self,
        bundle: Bundle,
        device: str | torch.device = "cpu",
        buckets: tuple[int, ...] | None = None,
    ) -> None:
        super().__init__(bundle, buckets)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineError("device cuda requested but no CUDA GPU is available")
        if self.device.type == "cpu":
            self.min_rows = CPU_MIN_ROWS

    def _run(self, model, steps, noise, labels):
        return reference_images(self.bundle, model, steps, noise, labels, self.device)

    def chunkable(self, model: str) -> bool:
        return True

    def _run_chunk(self, model, steps, z, labels, start, stop):
        den = self.bundle.denoiser(model, steps if model == "student" else None).to(self.device)
        out = ddim_steps(den, z.to(self.device), labels.to(self.device), steps, den.schedule,
                         start, stop)
        return out.float().cpu()
