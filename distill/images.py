"""Images in [-1, 1] -> uint8 pixels, grids and PNG bytes (shared by CLI, training and server)."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C], rounding to the nearest level."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x.to(torch.uint8).permute(0, 2, 3, 1).numpy()


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, cols): cols = ceil(sqrt(n)), filled row-major; unused cells stay black."""
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def make_grid(pixels: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, C] -> one uint8 [rows*H, cols*W, C] image, row-major, no padding."""
    n, h, w, c = pixels.shape
    rows, cols = grid_shape(n)
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[r * h : (r + 1) * h, col * w : (col + 1) * w] = pixels[i]
    return grid


def png_bytes(pixels: np.ndarray) -> bytes:
    """One uint8 [H, W, C] image (C = 1 or 3) as PNG bytes; deterministic for equal input."""
    mode = "L" if pixels.shape[-1] == 1 else "RGB"
    image = Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode=mode)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: torch.Tensor) -> bytes:
    return png_bytes(make_grid(to_uint8(images)))
